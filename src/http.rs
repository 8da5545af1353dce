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
//! | GET  | /api/health                    | liveness and a summary of the cluster              |
//! | GET  | /api/artifacts/{id}            | an artifact's content (Content-Type, Range)        |
//! | GET  | /ws                            | WebSocket: live activity, submit and cancel        |
//!
//! docs/api.md documents bodies and WebSocket messages.

mod api;
mod error;
mod ws;

use std::net::SocketAddr;

use actix_web::{web, App, HttpServer};
use multiplex_actors::cluster::Cluster;

pub use error::ApiError;

use crate::config::DaemonSection;

/// Default largest request body: a workflow with an inline ComfyUI graph is tens of KiB; a
/// megabyte leaves room without letting one client exhaust memory.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// How long a stopping daemon lets requests in flight finish.
const SHUTDOWN_GRACE_SECS: u64 = 2;

/// Request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
}

impl Limits {
    pub fn from_config(daemon: &DaemonSection) -> Limits {
        Limits {
            max_body_bytes: daemon.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY),
        }
    }
}

/// Builds the server and binds it; the caller spawns the returned future.
pub fn serve(
    cluster: Cluster,
    bind: &str,
    limits: Limits,
) -> std::io::Result<(actix_web::dev::Server, SocketAddr)> {
    let cluster = web::Data::new(cluster);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(cluster.clone())
            .app_data(error::json_config(limits.max_body_bytes))
            .app_data(web::PayloadConfig::new(limits.max_body_bytes))
            .wrap(tracing_actix_web::TracingLogger::default())
            .configure(api::routes)
            .route("/ws", web::get().to(ws::connect))
    })
    .workers(2)
    // WebSocket sessions never end by themselves: on shutdown, give requests in flight a
    // moment, not actix's default 30 seconds.
    .shutdown_timeout(SHUTDOWN_GRACE_SECS)
    .bind(bind)?;
    let addr = server.addrs().first().copied().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "bound to no address")
    })?;
    Ok((server.run(), addr))
}
