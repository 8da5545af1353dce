//! Shared HTTP plumbing: binding a simulator's actix server inside the
//! caller's System, stopping it, and ComfyUI's Origin check.

use std::{io, net::SocketAddr};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{Server, ServerHandle, ServiceRequest, ServiceResponse},
    http::header,
    middleware::{from_fn, Next},
    web, App, Error, HttpResponse, HttpServer,
};

/// A bound, running server.
pub(crate) struct Served {
    pub addr: SocketAddr,
    pub handle: ServerHandle,
}

/// Binds `addr` and spawns the server on the current actix System.
///
/// One worker is enough for a simulator and keeps start-up cheap; signals
/// are left to the host process (the daemon or the test harness).
pub(crate) fn spawn<F>(addr: SocketAddr, origin_check: bool, configure: F) -> io::Result<Served>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let (server, addr) = bind(addr, origin_check, configure)?;
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(Served { addr, handle })
}

/// Binds `addr` and returns the server future without spawning it.
pub(crate) fn bind<F>(
    addr: SocketAddr,
    origin_check: bool,
    configure: F,
) -> io::Result<(Server, SocketAddr)>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(move |req, next| {
                guard_origin(origin_check, req, next)
            }))
            .configure(configure.clone())
    })
    .workers(1)
    // Like the real servers, whose asyncio transports set TCP_NODELAY on every connection:
    // small WebSocket frames go out at once instead of waiting for the peer's delayed ACK.
    .tcp_nodelay(true)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(addr)?;
    let bound = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| io::Error::other("no address bound"))?;
    Ok((server.run(), bound))
}

/// Refuses (403, empty) a request whose Origin names another host than its
/// Host header, when Host is a loopback name: ComfyUI's CSRF guard.
async fn guard_origin(
    enabled: bool,
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    if enabled && origin_mismatch(&req) {
        tracing::debug!(path = req.path(), "refusing cross-origin request");
        let response = HttpResponse::Forbidden().finish();
        return Ok(req.into_response(response).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

fn origin_mismatch(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    let (Some(host), Some(origin)) = (headers.get(header::HOST), headers.get(header::ORIGIN))
    else {
        return false;
    };
    let (Ok(host), Ok(origin)) = (host.to_str(), origin.to_str()) else {
        return true;
    };
    let host = host.to_ascii_lowercase();
    let Ok(origin) = url::Url::parse(origin) else {
        return true;
    };
    let hostname = host
        .rsplit_once(':')
        .map_or(host.as_str(), |(name, _)| name);
    let loopback = matches!(hostname, "localhost" | "127.0.0.1" | "[::1]" | "::1");
    if !loopback {
        return false;
    }
    let origin_host = origin.host_str().unwrap_or_default().to_ascii_lowercase();
    let netloc = match origin.port() {
        Some(port) => format!("{origin_host}:{port}"),
        None => origin_host,
    };
    netloc != host
}
