//! Starting a daemon: configuration, store, actors and the HTTP server, in that order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use multiplex_actors::cluster::Cluster;
use multiplex_actors::store::Store;
use tracing::info;

use crate::auth::{self, Tokens};
use crate::config::{self, Simulators, DEFAULT_BIND, DEFAULT_DATA_DIR};
use crate::http;

/// What the command line may override.
#[derive(Clone, Default)]
pub struct DaemonOptions {
    /// A config file; the embedded default when absent.
    pub config: Option<PathBuf>,
    /// Listen address; port 0 picks a free port.
    pub bind: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `--allow-open`: serve without tokens on a non-loopback address (or `[daemon]
    /// allow_open`).
    pub allow_open: bool,
    /// Where the `[daemon] tokens` variables are read: the process environment when `None`.
    /// Tests pass a map instead of changing the environment of a multi-threaded process.
    pub environment: Option<HashMap<String, String>>,
}

/// By hand: `environment` holds tokens, so only its names are shown.
impl std::fmt::Debug for DaemonOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Option<Vec<&String>> = self.environment.as_ref().map(|m| m.keys().collect());
        f.debug_struct("DaemonOptions")
            .field("config", &self.config)
            .field("bind", &self.bind)
            .field("data_dir", &self.data_dir)
            .field("allow_open", &self.allow_open)
            .field("environment", &names)
            .finish()
    }
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
        url::Url::parse(&format!("http://{}/", self.addr))
            .expect("a socket address is a valid URL host")
    }

    /// Stops the HTTP server and the simulators this daemon started.
    pub async fn stop(self) {
        self.server.stop(true).await;
        // Each simulator waits for its connections to close; stop them all at once.
        let comfyui = self.sims.comfyui.into_iter().map(|sim| sim.stop());
        let langflow = self.sims.langflow.into_iter().map(|sim| sim.stop());
        futures_util::future::join(
            futures_util::future::join_all(comfyui),
            futures_util::future::join_all(langflow),
        )
        .await;
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
    // Before anything opens or starts: a missing token or an open daemon on a public
    // address stops startup with nothing to clean up.
    let tokens = match &options.environment {
        Some(map) => Tokens::load(&file.daemon.tokens, |name| map.get(name).cloned()),
        None => Tokens::load(&file.daemon.tokens, |name| std::env::var(name).ok()),
    }
    .with_context(|| format!("invalid configuration in {source}"))?;
    auth::check_exposure(&bind, &tokens, options.allow_open || file.daemon.allow_open)?;
    // Bind before any actor starts: a port in use is a plain error, and resumed runs never
    // reach a node on behalf of a daemon that is about to fail.
    let listener =
        std::net::TcpListener::bind(&bind).with_context(|| format!("cannot listen on {bind}"))?;

    let store = Store::open(&data_dir)?;
    let (cluster_config, sims) = config::resolve(&file)
        .await
        .with_context(|| format!("invalid configuration in {source}"))?;
    info!(config = %source, nodes = cluster_config.nodes.len(), data_dir = %data_dir.display(),
        "configuration loaded");

    let cluster = Cluster::start(cluster_config, templates, store)?;
    let resumed = cluster.resume_unfinished().await?;
    if resumed > 0 {
        info!(runs = resumed, "resumed unfinished runs");
    }

    let limits = http::Limits::from_config(&file.daemon);
    let open = tokens.is_open();
    let (server, addr) = http::serve(cluster.clone(), listener, limits, tokens)
        .with_context(|| format!("cannot serve on {bind}"))?;
    info!(%addr, open, "multiplex daemon listening");
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(RunningDaemon {
        addr,
        data_dir,
        cluster,
        server: handle,
        sims,
    })
}

/// Runs `future` to its end on a new actix system, then takes the system down inside its
/// runtime. Tasks still in flight (a health probe waiting on a node) are dropped with the
/// system, and dropping a pooled HTTP connection spawns its cleanup: outside the runtime that
/// panics, once per such task, as the daemon stops.
pub fn run_system<F: std::future::Future>(future: F) -> F::Output {
    let runner = actix_rt::System::new();
    let output = runner.block_on(future);
    let runtime = runner.runtime().tokio_runtime().handle().clone();
    let _inside = runtime.enter();
    drop(runner);
    output
}

/// A daemon running in an actix system of its own, on its own thread: what a separate
/// process would be, minus the process. Stopping it drops every actor, so its store is
/// closed and another daemon can open the same data directory (tests restart this way).
pub struct DaemonThread {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DaemonThread {
    /// Starts a daemon on a new thread and returns once it listens (or failed to start).
    pub fn spawn(options: DaemonOptions) -> anyhow::Result<DaemonThread> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("multiplex-daemon".into())
            .spawn(move || {
                run_system(async move {
                    let daemon = match start(options).await {
                        Ok(daemon) => daemon,
                        Err(err) => {
                            let _ = ready_tx.send(Err(err));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok((daemon.addr, daemon.data_dir.clone())));
                    let _ = stop_rx.await;
                    daemon.stop().await;
                });
            })?;
        let (addr, data_dir) = match ready_rx.recv() {
            Ok(result) => result?,
            Err(_) => anyhow::bail!("the daemon thread ended before it started listening"),
        };
        Ok(DaemonThread {
            addr,
            data_dir,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops the daemon and waits until its thread, and with it every actor, is gone.
    pub async fn stop(mut self) {
        self.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for DaemonThread {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
