//! Starting a daemon: configuration, store, actors and the HTTP server, in that order.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use multiplex_actors::cluster::Cluster;
use multiplex_actors::store::Store;
use tracing::info;

use crate::config::{self, Simulators, DEFAULT_BIND, DEFAULT_DATA_DIR};
use crate::http;

/// What the command line may override.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// A config file; the embedded default when absent.
    pub config: Option<PathBuf>,
    /// Listen address; port 0 picks a free port.
    pub bind: Option<String>,
    pub data_dir: Option<PathBuf>,
}

/// A started daemon. Dropping it does not stop it; call [`RunningDaemon::stop`].
pub struct RunningDaemon {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub cluster: Cluster,
    server: actix_web::dev::ServerHandle,
    /// Kept alive as long as the daemon: dropping stops nothing, `stop` does.
    sims: Simulators,
}

impl RunningDaemon {
    /// The base URL of the REST API and WebSocket.
    pub fn url(&self) -> url::Url {
        url::Url::parse(&format!("http://{}/", self.addr)).expect("a socket address is a valid URL host")
    }

    /// Stops the HTTP server and the simulators this daemon started.
    pub async fn stop(self) {
        self.server.stop(true).await;
        for sim in self.sims.comfyui {
            sim.stop().await;
        }
        for sim in self.sims.langflow {
            sim.stop().await;
        }
    }
}

/// Starts everything inside the current actix system and returns once the HTTP server is
/// listening and unfinished runs have been resumed.
pub async fn start(options: DaemonOptions) -> anyhow::Result<RunningDaemon> {
    let (file, source) = config::load(options.config.as_deref())?;
    let templates = config::templates(&file, &source)?;
    let data_dir = options
        .data_dir
        .clone()
        .or_else(|| file.daemon.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let bind = options
        .bind
        .clone()
        .or_else(|| file.daemon.bind.clone())
        .unwrap_or_else(|| DEFAULT_BIND.to_string());

    let store = Store::open(&data_dir)?;
    let (cluster_config, sims) = config::resolve(&file).await?;
    info!(config = %source, nodes = cluster_config.nodes.len(), data_dir = %data_dir.display(),
        "configuration loaded");

    let cluster = Cluster::start(cluster_config, templates, store);
    let resumed = cluster.resume_unfinished()?;
    if resumed > 0 {
        info!(runs = resumed, "resumed unfinished runs");
    }

    let limits = http::Limits::from_config(&file.daemon);
    let (server, addr) = http::serve(cluster.clone(), &bind, limits)
        .with_context(|| format!("cannot listen on {bind}"))?;
    info!(%addr, "multiplex daemon listening");
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(RunningDaemon { addr, data_dir, cluster, server: handle, sims })
}
