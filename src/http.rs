//! The daemon's HTTP interfaces.
//!
//! Routes:
//!
//! | verb | path                           | what                                              |
//! |------|--------------------------------|---------------------------------------------------|
//! | POST | /api/workflows                 | validate, store and start a workflow; 201 + run    |
//! | GET  | /api/workflows                 | runs, newest first (`?limit=`, `?before=<id>`)     |
//! | GET  | /api/workflows/{id}            | one run with its steps, errors and artifact links  |
//! | POST | /api/workflows/{id}/cancel     | cancel a run; 409 when it has already ended        |
//! | GET  | /api/nodes                     | nodes with availability, slots and capabilities    |
//! | GET  | /api/tunnels                   | SSH tunnels: state, since, reconnects, bytes moved  |
//! | POST | /api/tunnels/{node}/reconnect  | restart a node's tunnel (also a failed one)        |
//! | GET  | /api/health                    | liveness and a summary of the cluster              |
//! | GET  | /api/artifacts/{id}            | an artifact's content (Content-Type, Range)        |
//! | GET  | /ws                            | WebSocket: live activity, submit and cancel        |
//! | POST, GET, DELETE | /mcp          | MCP Streamable HTTP (see [`crate::mcp`])           |
//!
//! Any other path is answered 404 `not_found` naming the method and path; a listed path
//! asked with another method, 405 `method_not_allowed` with `Allow`.
//!
//! Every route but `GET /api/health` needs a bearer token of the right role when `[daemon]
//! tokens` are configured ([`auth`]).
//!
//! docs/api.md documents bodies, WebSocket messages and authentication; docs/mcp.md the MCP
//! server.

mod api;
pub mod auth;
mod error;
pub mod origin;
mod ws;

use std::net::SocketAddr;

use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use multiplex_actors::cluster::Cluster;

pub use api::run_view;
pub use error::ApiError;

use crate::auth::Tokens;
use crate::config::DaemonSection;

/// Default largest request body: a workflow with an inline ComfyUI graph is tens of KiB; a
/// megabyte leaves room without letting one client exhaust memory.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// How long a stopping daemon lets requests in flight finish.
const SHUTDOWN_GRACE_SECS: u64 = 2;

/// Request limits, and what /mcp accepts besides loopback.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub mcp: crate::mcp::McpSettings,
}

impl Limits {
    pub fn from_config(daemon: &DaemonSection) -> Limits {
        Limits {
            max_body_bytes: daemon.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY),
            mcp: crate::mcp::McpSettings {
                allowed_origins: daemon.allowed_origins.clone(),
                allowed_hosts: daemon.allowed_hosts.clone(),
            },
        }
    }
}

/// Builds the server on a bound listener; the caller spawns the returned future. With no `tokens`,
/// every request is an operator's (the caller decides whether that is allowed on `bind`,
/// see [`crate::auth::check_exposure`]).
pub fn serve(
    cluster: Cluster,
    listener: std::net::TcpListener,
    limits: Limits,
    tokens: Tokens,
) -> std::io::Result<(actix_web::dev::Server, SocketAddr)> {
    // MCP answers carry absolute artifact links to the bound address.
    let addr = listener.local_addr()?;
    let shared = crate::mcp::McpShared::new(cluster.clone(), format!("http://{addr}"));
    let mcp = crate::mcp::http_service(shared, &limits.mcp);
    let cluster = web::Data::new(cluster);
    let browsers = web::Data::new(origin::BrowserPolicy::new(
        &limits.mcp.allowed_origins,
        &limits.mcp.allowed_hosts,
        tokens.is_open(),
    ));
    let tokens = web::Data::new(tokens);
    let max_body_bytes = limits.max_body_bytes;
    let max_frame = web::Data::new(ws::MaxFrame::for_body_limit(max_body_bytes));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(cluster.clone())
            .app_data(tokens.clone())
            .app_data(browsers.clone())
            .app_data(max_frame.clone())
            .app_data(error::json_config(max_body_bytes))
            .app_data(error::query_config())
            .app_data(web::PayloadConfig::new(max_body_bytes))
            // Last wrapped runs first: the query token is gone before the logger sees the
            // URI, and refusals are logged inside the request's span.
            .wrap(from_fn(auth::authenticate))
            .wrap(from_fn(origin::guard))
            .wrap(tracing_actix_web::TracingLogger::default())
            .wrap(from_fn(auth::redact_query_token))
            .configure(api::routes)
            .service(error::resource("/ws", &["GET"]).route(web::get().to(ws::connect)))
            .service(
                mcp.clone()
                    .scope_with_path(crate::mcp::PATH)
                    .wrap(from_fn(crate::mcp::jsonrpc_errors))
                    .wrap(from_fn(crate::mcp::accept_shim)),
            )
            .default_service(web::to(error::unknown_route))
    })
    .workers(2)
    // Activity frames are small and latency matters: without this, Nagle's algorithm and
    // the client's delayed ACK hold a frame back for about 40 ms.
    .tcp_nodelay(true)
    // The process decides when to stop (main waits for SIGINT and SIGTERM): actix's own
    // handlers would stop this server and leave the process running without it.
    .disable_signals()
    // WebSocket sessions never end by themselves: on shutdown, give requests in flight a
    // moment, not actix's default 30 seconds.
    .shutdown_timeout(SHUTDOWN_GRACE_SECS)
    .listen(listener)?;
    Ok((server.run(), addr))
}
