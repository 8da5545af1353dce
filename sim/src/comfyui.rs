//! A ComfyUI 0.3.64 stand-in: HTTP API, WebSocket events, queue, history,
//! cache, uploads and real (small) outputs, plus switches that inject the
//! failures Multiplex must survive.
//!
//! Behaviour follows the recordings in `shared/fixtures/comfyui`; the module
//! files say which recording each part reproduces.

mod files;
mod nodes;
mod prompt;
mod registry;
mod routes;
mod state;
mod worker;
mod ws;

use std::{io, net::SocketAddr, sync::Arc};

use actix_web::{dev::ServerHandle, web};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use state::ComfySwitches;
use state::Shared;

/// How the simulated server behaves. Every field has a default, so
/// `{"step_ms": 5}` is a complete configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComfySimConfig {
    /// Time per sampler step and per ordinary node.
    pub step_ms: u64,
    /// Time of the first load of a model file.
    pub model_load_ms: u64,
    /// Total VRAM in MiB (reported in bytes by `/system_stats`).
    pub vram_mb: u64,
    /// VRAM one loaded model file occupies, in MiB.
    pub model_vram_mb: u64,
    /// Device name in `/system_stats`.
    pub gpu_name: String,
    /// Size of each binary preview frame sent while sampling (0 = none).
    pub preview_bytes: usize,
    /// Model files the server has, `name` (every folder) or `folder/name`;
    /// empty accepts any model name.
    pub models: Vec<String>,
    /// Serve `GET /api/jobs/{id}` like newer ComfyUI (0.3.64, the recorded version, has
    /// no such route).
    pub jobs_api: bool,
    /// Failure injection, also settable at run time.
    pub switches: ComfySwitches,
}

impl Default for ComfySimConfig {
    fn default() -> Self {
        ComfySimConfig {
            step_ms: 10,
            model_load_ms: 50,
            vram_mb: 24_576,
            model_vram_mb: 2_048,
            gpu_name: "cuda:0 NVIDIA GeForce RTX 4090 (simulated) : cudaMallocAsync".into(),
            preview_bytes: 0,
            models: Vec::new(),
            jobs_api: false,
            switches: ComfySwitches::default(),
        }
    }
}

/// A run-time change, the body of `POST /sim/control`; absent fields stay.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ComfyControl {
    pub fail_next: Option<u32>,
    pub oom_next: Option<u32>,
    pub stall: Option<bool>,
    pub drop_socket_next: Option<u32>,
    pub refuse_ws: Option<bool>,
    pub mint_prompt_ids: Option<bool>,
    /// Forget queue, history, cache and loaded models; close every socket.
    pub restart: bool,
    pub step_ms: Option<u64>,
    pub preview_bytes: Option<usize>,
}

fn apply_control(shared: &Shared, control: ComfyControl) {
    {
        let mut state = shared.state();
        let switches = &mut state.switches;
        set(&mut switches.fail_next, control.fail_next);
        set(&mut switches.oom_next, control.oom_next);
        set(&mut switches.stall, control.stall);
        set(&mut switches.drop_socket_next, control.drop_socket_next);
        set(&mut switches.refuse_ws, control.refuse_ws);
        set(&mut switches.mint_prompt_ids, control.mint_prompt_ids);
        shared.hub.set_stall(switches.stall);
        if control.restart {
            tracing::info!("simulating a ComfyUI restart");
            state.restart();
        }
    }
    if control.restart {
        shared.hub.close_all();
    }
    shared.update_config(|config| {
        set(&mut config.step_ms, control.step_ms);
        set(&mut config.preview_bytes, control.preview_bytes);
    });
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

fn stats_json(shared: &Shared) -> Value {
    let state = shared.state();
    let counters = &shared.counters;
    json!({
        "prompts_received": Shared::count(&counters.prompts_received),
        "prompts_finished": Shared::count(&counters.prompts_finished),
        "ws_connections": Shared::count(&counters.ws_connections),
        "ws_refused": Shared::count(&counters.ws_refused),
        "interrupts_received": Shared::count(&counters.interrupts_received),
        "interrupted_prompts": counters.interrupted_prompts(),
        "prompts_by_id": counters.prompts_by_id(),
        "duplicate_prompts": counters.duplicate_prompts(),
        "queue_remaining": state.queue_remaining(),
        "switches": state.switches,
    })
}

/// A running simulator. Dropping it without [`ComfySim::stop`] leaves the
/// server running until the actix System ends.
pub struct ComfySim {
    addr: SocketAddr,
    handle: ServerHandle,
    shared: Arc<Shared>,
    worker: tokio::task::JoinHandle<()>,
}

fn build(
    config: ComfySimConfig,
) -> io::Result<(
    Arc<Shared>,
    impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
)> {
    let shared = Arc::new(Shared::new(config, files::Files::create()?));
    let data = web::Data::new(shared.clone());
    let configure = move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(data.clone()).configure(routes::configure);
    };
    Ok((shared, configure))
}

impl ComfySim {
    /// Binds `addr` (port 0 picks a free port), starts serving on the
    /// current actix System and returns once the socket is bound.
    pub async fn start(config: ComfySimConfig, addr: SocketAddr) -> io::Result<ComfySim> {
        let (shared, configure) = build(config)?;
        let served = crate::http::spawn(addr, true, configure)?;
        let worker = tokio::spawn(worker::run(shared.clone()));
        tracing::info!(addr = %served.addr, "comfyui simulator listening");
        Ok(ComfySim {
            addr: served.addr,
            handle: served.handle,
            shared,
            worker,
        })
    }

    /// `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> url::Url {
        base_url(self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `POST /prompt` requests seen, accepted or not.
    pub fn prompts_received(&self) -> usize {
        Shared::count(&self.shared.counters.prompts_received)
    }

    /// `POST /prompt` requests per prompt id they named (ours in `extra_data` included).
    pub fn prompts_by_id(&self) -> std::collections::BTreeMap<String, usize> {
        self.shared.counters.prompts_by_id()
    }

    /// Prompt ids posted more than once; empty when every prompt ran at most once.
    pub fn duplicate_prompts(&self) -> Vec<String> {
        self.shared.counters.duplicate_prompts()
    }

    /// Ids of the prompts that ended interrupted, in order.
    pub fn interrupted_prompts(&self) -> Vec<String> {
        self.shared.counters.interrupted_prompts()
    }

    /// `POST /interrupt` requests received.
    pub fn interrupts_received(&self) -> usize {
        Shared::count(&self.shared.counters.interrupts_received)
    }

    /// WebSocket connections accepted so far.
    pub fn ws_connections(&self) -> usize {
        Shared::count(&self.shared.counters.ws_connections)
    }

    /// Applies a run-time change, as `POST /sim/control` does.
    pub fn control(&self, control: ComfyControl) {
        apply_control(&self.shared, control);
    }

    /// Stops serving, ends the worker and removes the instance's files.
    pub async fn stop(self) {
        self.shared.hub.close_all();
        self.handle.stop(true).await;
        self.worker.abort();
        tracing::info!(addr = %self.addr, "comfyui simulator stopped");
    }
}

pub(crate) fn base_url(addr: SocketAddr) -> url::Url {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        addr.ip().to_string()
    };
    let text = match addr {
        SocketAddr::V6(_) if !addr.ip().is_unspecified() => {
            format!("http://[{host}]:{}/", addr.port())
        }
        _ => format!("http://{host}:{}/", addr.port()),
    };
    // The text is built from a socket address, so it always parses.
    url::Url::parse(&text)
        .unwrap_or_else(|_| url::Url::parse("http://127.0.0.1/").expect("static url"))
}

/// Serves a ComfyUI simulator on `addr` until the process ends
/// (`multiplex sim comfyui --port P`). Needs an actix System.
pub async fn serve_comfyui_forever(config: ComfySimConfig, addr: SocketAddr) -> io::Result<()> {
    let (shared, configure) = build(config)?;
    let (server, bound) = crate::http::bind(addr, true, configure)?;
    tokio::spawn(worker::run(shared));
    tracing::info!(addr = %bound, "comfyui simulator listening");
    server.await
}
