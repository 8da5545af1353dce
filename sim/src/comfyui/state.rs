//! State shared by the HTTP handlers, the WebSocket sessions and the
//! execution worker. One std mutex guards it: every critical section is a
//! few map operations with no `.await` inside.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use super::{
    files::Files,
    nodes::Out,
    prompt::Graph,
    registry::{self, canonical_folder, ClassDef, ComboSource},
    ws::Hub,
    ComfySimConfig,
};

/// Test switches, settable in the config and through `POST /sim/control`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ComfySwitches {
    /// Fail the next N prompts with a RuntimeError `execution_error`.
    pub fail_next: u32,
    /// Fail the next N prompts with a `torch.OutOfMemoryError`.
    pub oom_next: u32,
    /// Send no WebSocket frames at all while set; prompts still run.
    pub stall: bool,
    /// For the next N prompts, close the submitter's socket after the
    /// first node and never send that prompt's remaining events.
    pub drop_socket_next: u32,
    /// Answer WebSocket upgrades with 503.
    pub refuse_ws: bool,
    /// Behave like ComfyUI before it took client-chosen prompt ids: ignore the `prompt_id`
    /// of `POST /prompt` and mint a UUID (read the answer to learn it), and make
    /// `POST /interrupt` ignore its body and stop whatever runs, as those servers do. The
    /// `extra_data` is kept in queue and history entries either way, as they keep it.
    pub mint_prompt_ids: bool,
}

/// A queued or running prompt.
#[derive(Debug)]
pub(crate) struct Queued {
    /// Integer when the server numbered it, float when the client did.
    pub number: Value,
    /// Tie-breaker: submission order.
    pub seq: u64,
    pub id: String,
    pub graph: Graph,
    pub extra_data: Map<String, Value>,
    pub outputs: Vec<String>,
}

impl Queued {
    pub fn client_id(&self) -> Option<&str> {
        self.extra_data.get("client_id").and_then(Value::as_str)
    }

    /// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
    pub fn entry(&self) -> Value {
        json!([
            self.number,
            self.id,
            self.graph,
            self.extra_data,
            self.outputs
        ])
    }

    fn sort_key(&self) -> (f64, u64) {
        (self.number.as_f64().unwrap_or_default(), self.seq)
    }
}

/// The prompt the worker is executing.
#[derive(Debug)]
pub(crate) struct Running {
    pub item: Arc<Queued>,
    /// The node it is in, resent to a client that reconnects.
    pub node: Option<String>,
}

/// A cached node result, keyed by the node's input signature.
#[derive(Clone, Debug)]
pub(crate) struct Cached {
    pub outputs: Vec<Out>,
    pub ui: Option<Value>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub number: i64,
    pub seq: u64,
    pub pending: Vec<Arc<Queued>>,
    pub running: Option<Running>,
    /// Finished prompts in completion order.
    pub history: Vec<(String, Value)>,
    /// Bumped by a simulated restart; the worker drops stale runs.
    pub generation: u64,
    /// Set by `/interrupt`; the worker consumes it at the next boundary.
    pub interrupt: bool,
    pub cache: HashMap<String, Cached>,
    pub loaded_models: HashSet<String>,
    pub switches: ComfySwitches,
}

impl State {
    pub fn queue_remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some())
    }

    /// Removes the pending prompt that sorts first (lowest number).
    pub fn take_next(&mut self) -> Option<Arc<Queued>> {
        let index = (0..self.pending.len()).min_by(|a, b| {
            let (ka, kb) = (self.pending[*a].sort_key(), self.pending[*b].sort_key());
            ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal)
        })?;
        Some(self.pending.remove(index))
    }

    pub fn sorted_pending(&self) -> Vec<Value> {
        let mut items: Vec<&Arc<Queued>> = self.pending.iter().collect();
        items.sort_by(|a, b| {
            a.sort_key()
                .partial_cmp(&b.sort_key())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        items.iter().map(|q| q.entry()).collect()
    }

    /// Forgets everything a process restart would lose.
    pub fn restart(&mut self) {
        let generation = self.generation + 1;
        let switches = std::mem::take(&mut self.switches);
        *self = State {
            generation,
            switches,
            ..State::default()
        };
    }
}

/// Counters reported by `GET /sim/stats`. A simulated restart keeps them: they describe
/// what the client did, for exactly-once checks across restarts.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub prompts_received: AtomicUsize,
    pub ws_connections: AtomicUsize,
    /// WebSocket upgrades answered 503 because `refuse_ws` was set: how hard a client
    /// keeps knocking on a door that stays shut.
    pub ws_refused: AtomicUsize,
    pub prompts_finished: AtomicUsize,
    /// `POST /interrupt` requests, whether or not they stopped anything.
    pub interrupts_received: AtomicUsize,
    /// Ids of the prompts that ended interrupted, in order: which work a cancel stopped.
    pub interrupted_prompts: Mutex<Vec<String>>,
    /// `POST /prompt` requests per id they name (`prompt_id`, or
    /// `extra_data.multiplex_prompt_id`; a request naming one id in both counts once).
    pub prompts_by_id: Mutex<BTreeMap<String, usize>>,
}

/// Where Multiplex puts its own prompt id, for servers that mint their own.
const MULTIPLEX_PROMPT_ID: &str = "multiplex_prompt_id";

impl Counters {
    /// Counts one `POST /prompt` body for every id it names.
    pub fn count_prompt_ids(&self, body: &Map<String, Value>) {
        let named = body.get("prompt_id").and_then(Value::as_str);
        let ours = body
            .get("extra_data")
            .and_then(|extra| extra.get(MULTIPLEX_PROMPT_ID))
            .and_then(Value::as_str);
        let ids: BTreeSet<&str> = named.into_iter().chain(ours).collect();
        let mut counts = self.prompts_by_id.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            *counts.entry(id.to_owned()).or_default() += 1;
        }
    }

    /// Posts per prompt id.
    pub fn prompts_by_id(&self) -> BTreeMap<String, usize> {
        self.prompts_by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records that `prompt_id` ended interrupted.
    pub fn count_interrupted(&self, prompt_id: &str) {
        self.interrupted_prompts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(prompt_id.to_owned());
    }

    pub fn interrupted_prompts(&self) -> Vec<String> {
        self.interrupted_prompts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ids posted more than once: GPU work a client asked for twice.
    pub fn duplicate_prompts(&self) -> Vec<String> {
        let counts = self.prompts_by_id();
        counts
            .into_iter()
            .filter(|(_, count)| *count > 1)
            .map(|(id, _)| id)
            .collect()
    }
}

/// Everything the simulator's tasks share.
pub(crate) struct Shared {
    pub classes: HashMap<&'static str, ClassDef>,
    pub files: Files,
    pub config: Mutex<ComfySimConfig>,
    pub state: Mutex<State>,
    pub wake: Notify,
    pub hub: Hub,
    pub counters: Counters,
}

impl Shared {
    pub fn new(config: ComfySimConfig, files: Files) -> Shared {
        let classes = registry::classes()
            .into_iter()
            .map(|c| (c.name, c))
            .collect();
        let state = State {
            switches: config.switches.clone(),
            ..State::default()
        };
        Shared {
            classes,
            files,
            hub: Hub::new(config.switches.stall),
            config: Mutex::new(config),
            state: Mutex::new(state),
            wake: Notify::new(),
            counters: Counters::default(),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the data is plain.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> ComfySimConfig {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update_config(&self, change: impl FnOnce(&mut ComfySimConfig)) {
        change(&mut self.config.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Model files listed for `folder` (entries may be `folder/name`).
    pub fn models(&self, folder: &str) -> Vec<String> {
        let folder = canonical_folder(folder);
        let config = self.config();
        config
            .models
            .iter()
            .filter_map(|m| match m.split_once('/') {
                Some((f, name)) if canonical_folder(f) == folder => Some(name.to_owned()),
                Some(_) => None,
                None => Some(m.clone()),
            })
            .collect()
    }

    /// Runs `f` with the dynamic combo lists resolved now.
    pub fn with_combos<R>(&self, f: impl FnOnce(&ComboSource<'_>) -> R) -> R {
        let input_files = self.files.input_files();
        let models = |folder: &str| self.models(folder);
        f(&ComboSource {
            models: &models,
            input_files: &input_files,
        })
    }

    /// Broadcasts the queue size to every socket.
    pub fn broadcast_status(&self) {
        let remaining = self.state().queue_remaining();
        self.hub.broadcast(&status_frame(remaining, None));
    }

    pub fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::Relaxed)
    }
}

/// A `status` message; `sid` only in the first frame of a connection.
pub(crate) fn status_frame(queue_remaining: usize, sid: Option<&str>) -> String {
    let mut data = json!({"status": {"exec_info": {"queue_remaining": queue_remaining}}});
    if let Some(sid) = sid {
        data["sid"] = json!(sid);
    }
    json!({"type": "status", "data": data}).to_string()
}

/// `registry::MODEL_FOLDERS`, re-exported for the routes.
pub(crate) fn model_folders() -> &'static [&'static str] {
    registry::MODEL_FOLDERS
}
