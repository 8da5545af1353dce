//! A LangFlow 1.13 stand-in: the run API (JSON and streamed), health
//! routes, v1 file uploads, and a few built-in flows with deterministic
//! answers. Shapes follow `shared/fixtures/langflow`.

mod flows;
mod message;
mod monitor;
mod routes;

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::AtomicUsize, Arc},
};

use actix_web::{dev::ServerHandle, web};
use serde::{Deserialize, Serialize};

pub use flows::FlowBehavior;
pub use monitor::LangflowControl;

/// One flow the simulator serves.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimFlow {
    /// Flow id (a UUID), usable in `/api/v1/run/{id}`.
    pub id: String,
    /// Alternative name for `/api/v1/run/{endpoint_name}`.
    pub endpoint_name: Option<String>,
    pub name: String,
    pub behavior: FlowBehavior,
}

impl SimFlow {
    fn new(id: &str, endpoint: &str, behavior: FlowBehavior) -> SimFlow {
        SimFlow {
            id: id.to_owned(),
            endpoint_name: Some(endpoint.to_owned()),
            name: endpoint.to_owned(),
            behavior,
        }
    }
}

/// How the simulated server behaves.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LangflowSimConfig {
    /// Required `x-api-key`; `None` accepts every request.
    pub api_key: Option<String>,
    /// Delay per streamed token (and per token of a non-streamed answer)
    /// of the flows that stand for an LLM.
    pub token_delay_ms: u64,
    pub flows: Vec<SimFlow>,
}

impl Default for LangflowSimConfig {
    fn default() -> Self {
        LangflowSimConfig {
            api_key: None,
            token_delay_ms: 5,
            flows: vec![
                SimFlow::new(
                    "6f1c3a52-2a8e-4d5b-9a41-0c1e5d7b8a01",
                    "narration-text",
                    FlowBehavior::NarrateText,
                ),
                SimFlow::new(
                    "6f1c3a52-2a8e-4d5b-9a41-0c1e5d7b8a02",
                    "narration-visual",
                    FlowBehavior::NarrateVisual,
                ),
                SimFlow::new(
                    "6f1c3a52-2a8e-4d5b-9a41-0c1e5d7b8a03",
                    "prompt-expansion",
                    FlowBehavior::ExpandPrompt,
                ),
                SimFlow::new(
                    "6f1c3a52-2a8e-4d5b-9a41-0c1e5d7b8a04",
                    "echo",
                    FlowBehavior::Echo,
                ),
                SimFlow::new(
                    "6f1c3a52-2a8e-4d5b-9a41-0c1e5d7b8a05",
                    "fail",
                    FlowBehavior::Fail,
                ),
            ],
        }
    }
}

/// State shared by the handlers.
pub(crate) struct Shared {
    config: LangflowSimConfig,
    /// Uploaded files, `{flow_id}/{stamp}_{name}` below this folder.
    storage: tempfile::TempDir,
    runs: AtomicUsize,
    /// Stored messages, runs per session and the run-time switches.
    memory: std::sync::Mutex<monitor::Memory>,
}

impl Shared {
    fn flow(&self, id_or_name: &str) -> Option<&SimFlow> {
        let flows = &self.config.flows;
        flows.iter().find(|f| f.id == id_or_name).or_else(|| {
            flows
                .iter()
                .find(|f| f.endpoint_name.as_deref() == Some(id_or_name))
        })
    }

    fn storage(&self) -> PathBuf {
        self.storage.path().to_path_buf()
    }
}

/// A running simulator.
pub struct LangflowSim {
    addr: SocketAddr,
    handle: ServerHandle,
    shared: Arc<Shared>,
}

fn build(
    config: LangflowSimConfig,
) -> io::Result<(
    Arc<Shared>,
    impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
)> {
    let storage = tempfile::Builder::new()
        .prefix("multiplex-langflow-sim")
        .tempdir()?;
    let shared = Arc::new(Shared {
        config,
        storage,
        runs: AtomicUsize::new(0),
        memory: monitor::new_memory(),
    });
    let data = web::Data::new(shared.clone());
    let configure = move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(data.clone()).configure(routes::configure);
    };
    Ok((shared, configure))
}

impl LangflowSim {
    /// Binds `addr` (port 0 picks a free port) and starts serving on the
    /// current actix System.
    pub async fn start(config: LangflowSimConfig, addr: SocketAddr) -> io::Result<LangflowSim> {
        let (shared, configure) = build(config)?;
        let served = crate::http::spawn(addr, false, configure)?;
        tracing::info!(addr = %served.addr, "langflow simulator listening");
        Ok(LangflowSim {
            addr: served.addr,
            handle: served.handle,
            shared,
        })
    }

    pub fn url(&self) -> url::Url {
        crate::comfyui::base_url(self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `POST /api/v1/run/...` requests seen, whatever their outcome.
    pub fn runs_received(&self) -> usize {
        self.shared.runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs per session id (runs that got past the key, flow and body checks).
    pub fn runs_by_session(&self) -> std::collections::BTreeMap<String, usize> {
        self.shared.runs_by_session()
    }

    /// Session ids run more than once: a flow asked to do the same work twice.
    pub fn duplicate_sessions(&self) -> Vec<String> {
        self.shared.duplicate_sessions()
    }

    /// Applies a run-time change, as `POST /sim/control` does.
    pub fn control(&self, control: LangflowControl) {
        self.shared.apply_control(control);
    }

    /// The configured flows (ids and endpoint names to call).
    pub fn flows(&self) -> &[SimFlow] {
        &self.shared.config.flows
    }

    /// Stops serving and removes uploaded files.
    pub async fn stop(self) {
        self.handle.stop(true).await;
        tracing::info!(addr = %self.addr, "langflow simulator stopped");
    }
}

/// Serves a LangFlow simulator on `addr` until the process ends
/// (`multiplex sim langflow --port P`). Needs an actix System.
pub async fn serve_langflow_forever(config: LangflowSimConfig, addr: SocketAddr) -> io::Result<()> {
    let (_shared, configure) = build(config)?;
    let (server, bound) = crate::http::bind(addr, false, configure)?;
    tracing::info!(addr = %bound, "langflow simulator listening");
    server.await
}
