//! The execution worker: runs the queue one prompt at a time and emits the
//! WebSocket messages in the order the recordings show (a_basic, d_cached,
//! e_interrupt, g_exec_error, h_ws_binary).

use std::{
    collections::{HashMap, HashSet},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{
    nodes::{self, Args, NodeFailure, Out, SaveContext},
    state::{Cached, Queued, Running, Shared},
    ws::Frame,
};
use crate::media;

/// Classes that load a model file (slow the first time, then cached).
const LOADERS: &[&str] = &[
    "CheckpointLoaderSimple",
    "UNETLoader",
    "VAELoader",
    "CLIPLoader",
    "DualCLIPLoader",
    "CLIPVisionLoader",
];

/// Classes that sample step by step and send progress and previews.
const SAMPLERS: &[&str] = &["KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced"];

/// Runs the queue forever.
pub(crate) async fn run(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut state = shared.state();
            let generation = state.generation;
            state.take_next().map(|item| {
                state.interrupt = false;
                state.running = Some(Running {
                    item: item.clone(),
                    node: None,
                });
                (item, generation)
            })
        };
        match next {
            Some((item, generation)) => {
                Execution::new(shared.clone(), item, generation).run().await
            }
            None => shared.wake.notified().await,
        }
    }
}

/// Why a prompt stopped early.
enum Stop {
    Interrupted(String),
    Failed(String, NodeFailure),
    /// A simulated restart forgot this prompt.
    Forgotten,
}

/// A failure the switches injected into this prompt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Injected {
    None,
    Runtime,
    OutOfMemory,
}

struct Execution {
    shared: Arc<Shared>,
    item: Arc<Queued>,
    generation: u64,
    client: Option<String>,
    /// Lifecycle messages stored in history (start, cached, end).
    messages: Vec<Value>,
    progress: Map<String, Value>,
    executed: Vec<String>,
    results: HashMap<String, Vec<Out>>,
    outputs: Map<String, Value>,
    meta: Map<String, Value>,
    signatures: HashMap<String, String>,
    injected: Injected,
    drop_socket: bool,
    /// Set once the socket was dropped: the rest of the events are lost.
    lossy: bool,
    temp_prefix: String,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Execution {
    fn new(shared: Arc<Shared>, item: Arc<Queued>, generation: u64) -> Execution {
        let (injected, drop_socket) = take_switches(&shared);
        let temp_prefix: String = uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .chars()
            .filter(char::is_ascii_lowercase)
            .chain("abcde".chars())
            .take(5)
            .collect();
        Execution {
            client: item.client_id().map(str::to_owned),
            shared,
            item,
            generation,
            messages: Vec::new(),
            progress: Map::new(),
            executed: Vec::new(),
            results: HashMap::new(),
            outputs: Map::new(),
            meta: Map::new(),
            signatures: HashMap::new(),
            injected,
            drop_socket,
            lossy: false,
            temp_prefix,
        }
    }

    async fn run(mut self) {
        let prompt_id = self.item.id.clone();
        tracing::debug!(%prompt_id, "prompt started");
        self.shared.broadcast_status();
        self.lifecycle(
            "execution_start",
            json!({"prompt_id": prompt_id, "timestamp": now_ms()}),
        );
        let order = execution_order(&self.item);
        let cached = self.cached_nodes(&order);
        let cached_ids: Vec<&String> = order.iter().filter(|id| cached.contains_key(*id)).collect();
        let data = json!({"nodes": cached_ids, "prompt_id": prompt_id, "timestamp": now_ms()});
        self.lifecycle("execution_cached", data);
        let outcome = self.run_nodes(&order, &cached).await;
        self.finish(outcome);
    }

    async fn run_nodes(
        &mut self,
        order: &[String],
        cached: &HashMap<String, Cached>,
    ) -> Result<(), Stop> {
        let fail_at = self.failure_node(order, cached);
        for id in order {
            if let Some(hit) = cached.get(id) {
                self.replay_cached(id, hit);
                continue;
            }
            self.run_node(id, fail_at.as_deref() == Some(id.as_str()))
                .await?;
        }
        Ok(())
    }

    async fn run_node(&mut self, id: &str, fail_here: bool) -> Result<(), Stop> {
        let class = self
            .item
            .graph
            .class_type(id)
            .unwrap_or_default()
            .to_owned();
        self.set_progress(id, json!(0.0), json!(1.0), "running");
        if let Some(running) = self.shared.state().running.as_mut() {
            running.node = Some(id.to_owned());
        }
        let executing = json!({"node": id, "display_node": id, "prompt_id": self.item.id});
        self.send("executing", executing);
        if self.drop_socket {
            self.drop_socket = false;
            self.lossy = true;
            if let Some(client) = &self.client {
                self.shared.hub.close(client);
            }
        }
        self.checkpoint(id)?;
        if fail_here {
            return Err(Stop::Failed(id.to_owned(), self.injected_failure()));
        }
        self.spend_time(id, &class).await?;
        let produced = self
            .evaluate(id, &class)
            .map_err(|f| Stop::Failed(id.to_owned(), f))?;
        let signature = self.signatures.get(id).cloned().unwrap_or_default();
        let entry = Cached {
            outputs: produced.outputs.clone(),
            ui: produced.ui.clone(),
        };
        self.shared.state().cache.insert(signature, entry);
        self.results.insert(id.to_owned(), produced.outputs);
        if let Some(ui) = produced.ui {
            self.report_output(id, ui);
        }
        let (value, max) = match self.progress.get(id) {
            Some(entry) if entry["max"].is_u64() => (entry["max"].clone(), entry["max"].clone()),
            _ => (json!(1.0), json!(1.0)),
        };
        self.set_progress(id, value, max, "finished");
        self.executed.push(id.to_owned());
        Ok(())
    }

    /// A cached node produces nothing on the wire unless it has UI output,
    /// which is resent as `executed` (d_cached run 2).
    fn replay_cached(&mut self, id: &str, hit: &Cached) {
        self.results.insert(id.to_owned(), hit.outputs.clone());
        if let Some(ui) = &hit.ui {
            self.report_output(id, ui.clone());
            self.set_progress(id, json!(1), json!(1), "finished");
        }
    }

    fn report_output(&mut self, id: &str, ui: Value) {
        let data = json!({"node": id, "display_node": id, "output": ui,
            "prompt_id": self.item.id});
        self.send("executed", data);
        self.outputs.insert(id.to_owned(), ui);
        let meta = json!({"node_id": id, "display_node": id, "parent_node": null,
            "real_node_id": id});
        self.meta.insert(id.to_owned(), meta);
    }

    /// Interrupts land at node boundaries, and between sampler steps as
    /// ComfyUI's sampler callback raises them; restarts abandon the run.
    fn checkpoint(&self, id: &str) -> Result<(), Stop> {
        let mut state = self.shared.state();
        if state.generation != self.generation {
            return Err(Stop::Forgotten);
        }
        if std::mem::take(&mut state.interrupt) {
            return Err(Stop::Interrupted(id.to_owned()));
        }
        Ok(())
    }

    async fn spend_time(&mut self, id: &str, class: &str) -> Result<(), Stop> {
        let config = self.shared.config();
        if LOADERS.contains(&class) {
            let literals = self.item.graph.inputs(id).cloned().unwrap_or_default();
            let names: Vec<String> = literals
                .iter()
                .filter(|(k, _)| k.ends_with("_name") || k.starts_with("clip_name"))
                .filter_map(|(_, v)| v.as_str().map(str::to_owned))
                .collect();
            let fresh = {
                let mut state = self.shared.state();
                names
                    .into_iter()
                    .filter(|n| state.loaded_models.insert(n.clone()))
                    .count()
            };
            let wait = if fresh > 0 {
                config.model_load_ms
            } else {
                config.step_ms
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
            return self.still_current();
        }
        if SAMPLERS.contains(&class) {
            return self.sample(id, config.step_ms, config.preview_bytes).await;
        }
        if class == "SaveImageWebsocket" {
            self.stream_images(id);
        }
        tokio::time::sleep(Duration::from_millis(config.step_ms)).await;
        self.still_current()
    }

    /// An ordinary node always finishes; only a restart abandons it.
    fn still_current(&self) -> Result<(), Stop> {
        if self.shared.state().generation != self.generation {
            return Err(Stop::Forgotten);
        }
        Ok(())
    }

    async fn sample(&mut self, id: &str, step_ms: u64, preview_bytes: usize) -> Result<(), Stop> {
        let steps = self.sampler_steps(id);
        let preview = if preview_bytes > 0 {
            media::noise_png(preview_bytes, steps).ok().map(Bytes::from)
        } else {
            None
        };
        for step in 1..=steps {
            tokio::time::sleep(Duration::from_millis(step_ms)).await;
            self.checkpoint(id)?;
            self.step_progress(id, step, steps, preview.as_ref());
        }
        Ok(())
    }

    /// A KSampler's own `steps`; SamplerCustomAdvanced runs as many steps as
    /// the sigmas linked into it schedule (BasicScheduler's `steps`).
    fn sampler_steps(&self, id: &str) -> u64 {
        let inputs = self.item.graph.inputs(id);
        if let Some(link) = inputs.and_then(|i| i.get("sigmas")) {
            return match self.link_output(link) {
                Some(Out::Sigmas(steps)) => *steps,
                _ => 0,
            };
        }
        inputs
            .and_then(|i| i.get("steps"))
            .and_then(Value::as_u64)
            .unwrap_or(20)
            .clamp(1, 10_000)
    }

    /// The value a `[node, slot]` link carries, once its node has run.
    fn link_output(&self, link: &Value) -> Option<&Out> {
        let source = link.get(0)?;
        let source = source
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| source.to_string());
        let slot = link.get(1)?.as_u64()? as usize;
        self.results.get(&source)?.get(slot)
    }

    /// One progress tick: progress_state, then `progress` and a type-1
    /// preview for plain clients, or a type-4 preview then `progress` for
    /// clients that sent feature_flags (h_ws_binary).
    fn step_progress(&mut self, id: &str, value: u64, max: u64, preview: Option<&Bytes>) {
        self.set_progress(id, json!(value), json!(max), "running");
        let progress = json!({"value": value, "max": max, "prompt_id": self.item.id, "node": id});
        let Some(image) = preview else {
            self.send("progress", progress);
            return;
        };
        let metadata = self
            .client
            .as_ref()
            .is_some_and(|c| self.shared.hub.wants_metadata(c));
        if metadata {
            self.send_binary(preview_with_metadata(id, &self.item.id, image));
            self.send("progress", progress);
        } else {
            self.send("progress", progress);
            self.send_binary(plain_preview(image));
        }
    }

    fn stream_images(&mut self, id: &str) {
        let image = self.link_image(id, "images");
        let Some(image) = image else { return };
        let count = image.frames.len() as u64;
        for index in 0..image.frames.len() {
            let Ok(png) = media::encode_png(&image, index, &[]) else {
                continue;
            };
            self.step_progress(id, index as u64, count, Some(&Bytes::from(png)));
        }
    }

    fn link_image(&self, id: &str, input: &str) -> Option<Arc<media::Image>> {
        let link = self.item.graph.inputs(id)?.get(input)?.as_array()?.clone();
        let source = link.first()?.as_str()?;
        let slot = link.get(1)?.as_u64()? as usize;
        match self.results.get(source)?.get(slot)? {
            Out::Image(image) => Some(image.clone()),
            _ => None,
        }
    }

    fn evaluate(&self, id: &str, class: &str) -> Result<nodes::Produced, NodeFailure> {
        let empty = Map::new();
        let literals = self.item.graph.inputs(id).unwrap_or(&empty);
        let mut links = HashMap::new();
        for (name, value) in literals {
            let Some(link) = value.as_array().filter(|a| a.len() == 2) else {
                continue;
            };
            let source = link[0]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| link[0].to_string());
            let slot = link[1].as_u64().unwrap_or_default() as usize;
            if let Some(out) = self.results.get(&source).and_then(|o| o.get(slot)) {
                links.insert(name.clone(), out.clone());
            }
        }
        let prompt_json = serde_json::to_string(&self.item.graph).unwrap_or_default();
        let save = SaveContext {
            files: &self.shared.files,
            prompt_json: &prompt_json,
            temp_prefix: &self.temp_prefix,
        };
        nodes::evaluate(class, &Args { literals, links }, &save)
    }

    fn set_progress(&mut self, id: &str, value: Value, max: Value, state: &str) {
        let entry = json!({"value": value, "max": max, "state": state, "node_id": id,
            "prompt_id": self.item.id, "display_node_id": id, "parent_node_id": null,
            "real_node_id": id});
        self.progress.insert(id.to_owned(), entry);
        let data = json!({"prompt_id": self.item.id, "nodes": self.progress});
        self.send("progress_state", data);
    }

    /// Sends to the submitting client only (nobody without a client_id).
    fn send(&self, kind: &str, data: Value) {
        if self.lossy {
            return;
        }
        if let Some(client) = &self.client {
            let text = json!({"type": kind, "data": data}).to_string();
            self.shared.hub.send(client, Frame::Text(text));
        }
    }

    fn send_binary(&self, bytes: Bytes) {
        if let (false, Some(client)) = (self.lossy, &self.client) {
            self.shared.hub.send(client, Frame::Binary(bytes));
        }
    }

    /// Sends a message that history also records.
    fn lifecycle(&mut self, kind: &str, data: Value) {
        self.messages.push(json!([kind, data]));
        self.send(kind, data);
    }

    fn cached_nodes(&mut self, order: &[String]) -> HashMap<String, Cached> {
        for id in order {
            signature(&self.item, &self.shared, id, &mut self.signatures);
        }
        let state = self.shared.state();
        order
            .iter()
            .filter_map(|id| {
                let hit = state.cache.get(self.signatures.get(id)?)?;
                Some((id.clone(), hit.clone()))
            })
            .collect()
    }

    fn failure_node(&self, order: &[String], cached: &HashMap<String, Cached>) -> Option<String> {
        if self.injected == Injected::None {
            return None;
        }
        let runnable: Vec<&String> = order
            .iter()
            .filter(|id| !cached.contains_key(*id))
            .collect();
        let class = |id: &str| {
            self.item
                .graph
                .class_type(id)
                .unwrap_or_default()
                .to_owned()
        };
        runnable
            .iter()
            .find(|id| SAMPLERS.contains(&class(id).as_str()))
            .or(runnable.first())
            .map(|id| (*id).clone())
    }

    fn injected_failure(&self) -> NodeFailure {
        match self.injected {
            Injected::OutOfMemory => NodeFailure {
                exception_type: "torch.OutOfMemoryError".into(),
                message: "Allocation on device \nThis error means you ran out of memory on your \
                          GPU.\n\nTIPS: If the workflow worked before you might have \
                          accidentally set the batch_size to a large number."
                    .into(),
            },
            _ => NodeFailure::runtime("simulated failure (multiplex-sim fail switch)\n"),
        }
    }

    fn finish(mut self, outcome: Result<(), Stop>) {
        let prompt_id = self.item.id.clone();
        let stamp = now_ms();
        let (kind, data) = match outcome {
            Ok(()) => (
                "execution_success",
                json!({"prompt_id": prompt_id, "timestamp": stamp}),
            ),
            Err(Stop::Forgotten) => {
                tracing::debug!(%prompt_id, "prompt forgotten by a simulated restart");
                return;
            }
            Err(Stop::Interrupted(node)) => {
                ("execution_interrupted", self.interrupted(&node, stamp))
            }
            Err(Stop::Failed(node, failure)) => {
                ("execution_error", self.error(&node, failure, stamp))
            }
        };
        let success = kind == "execution_success";
        if !success {
            self.outputs.clear();
            self.meta.clear();
        }
        self.messages.push(json!([kind, data]));
        let entry = json!({
            "prompt": self.item.entry(),
            "outputs": self.outputs,
            "status": {"status_str": if success { "success" } else { "error" },
                "completed": success, "messages": self.messages},
            "meta": self.meta,
        });
        // History is written before execution_success, as in ComfyUI.
        let remaining = {
            let mut state = self.shared.state();
            if state.generation != self.generation {
                return;
            }
            state.history.push((prompt_id.clone(), entry));
            state.running = None;
            state.queue_remaining()
        };
        self.shared
            .counters
            .prompts_finished
            .fetch_add(1, Ordering::Relaxed);
        if kind == "execution_interrupted" {
            self.shared.counters.count_interrupted(&prompt_id);
        }
        tracing::debug!(%prompt_id, outcome = kind, "prompt finished");
        self.send(kind, data);
        self.shared
            .hub
            .broadcast(&super::state::status_frame(remaining, None));
        self.send("executing", json!({"node": null, "prompt_id": prompt_id}));
    }

    fn interrupted(&self, node: &str, stamp: i64) -> Value {
        json!({"prompt_id": self.item.id, "node_id": node,
            "node_type": self.item.graph.class_type(node), "executed": self.executed,
            "timestamp": stamp})
    }

    fn error(&self, node: &str, failure: NodeFailure, stamp: i64) -> Value {
        let class = self.item.graph.class_type(node).unwrap_or_default();
        let traceback = [
            "  File \"/srv/comfyui/execution.py\", line 496, in execute\n    \
                          output_data, output_ui, has_subgraph, has_pending_tasks = await \
                          get_output_data(...)\n",
        ];
        let inputs: Map<String, Value> = self
            .item
            .graph
            .inputs(node)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), json!([v.to_string()])))
                    .collect()
            })
            .unwrap_or_default();
        let mut current: Vec<&String> = self.results.keys().collect();
        current.sort();
        json!({"prompt_id": self.item.id, "node_id": node, "node_type": class,
            "executed": self.executed, "exception_message": failure.message,
            "exception_type": failure.exception_type, "traceback": traceback,
            "current_inputs": inputs, "current_outputs": current, "timestamp": stamp})
    }
}

/// Consumes the switches that apply to one prompt.
fn take_switches(shared: &Shared) -> (Injected, bool) {
    let mut state = shared.state();
    let switches = &mut state.switches;
    let injected = if switches.oom_next > 0 {
        switches.oom_next -= 1;
        Injected::OutOfMemory
    } else if switches.fail_next > 0 {
        switches.fail_next -= 1;
        Injected::Runtime
    } else {
        Injected::None
    };
    let drop_socket = switches.drop_socket_next > 0;
    if drop_socket {
        switches.drop_socket_next -= 1;
    }
    (injected, drop_socket)
}

/// Nodes to run: ancestors first, output by output, in graph order.
fn execution_order(item: &Queued) -> Vec<String> {
    fn visit(item: &Queued, id: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(id.to_owned()) {
            return;
        }
        if let Some(inputs) = item.graph.inputs(id) {
            for value in inputs.values() {
                let Some(link) = value.as_array().filter(|a| a.len() == 2) else {
                    continue;
                };
                if let Some(source) = link[0].as_str() {
                    visit(item, source, seen, order);
                }
            }
        }
        order.push(id.to_owned());
    }
    let (mut seen, mut order) = (HashSet::new(), Vec::new());
    for output in &item.outputs {
        visit(item, output, &mut seen, &mut order);
    }
    order
}

/// A node's input signature: class, literal inputs and upstream signatures
/// (plus the file's bytes for LoadImage), so unchanged nodes hit the cache.
fn signature(
    item: &Queued,
    shared: &Shared,
    id: &str,
    memo: &mut HashMap<String, String>,
) -> String {
    if let Some(known) = memo.get(id) {
        return known.clone();
    }
    let mut hasher = Sha256::new();
    hasher.update(item.graph.class_type(id).unwrap_or_default());
    let inputs = item.graph.inputs(id).cloned().unwrap_or_default();
    for (name, value) in &inputs {
        hasher.update(name.as_bytes());
        match value.as_array().filter(|a| a.len() == 2) {
            Some(link) => {
                let source = link[0].as_str().unwrap_or_default();
                hasher.update(signature(item, shared, source, memo));
                hasher.update(link[1].to_string());
            }
            None => hasher.update(value.to_string()),
        }
    }
    if item.graph.class_type(id) == Some("LoadImage") {
        let file = inputs
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(bytes) = shared
            .files
            .input_path(file)
            .and_then(|p| std::fs::read(p).ok())
        {
            hasher.update(bytes);
        }
    }
    let digest = hex::encode(hasher.finalize());
    memo.insert(id.to_owned(), digest.clone());
    digest
}

/// Binary type 1: `u32 type, u32 format (2 = PNG), image`.
fn plain_preview(image: &Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(image.len() + 8);
    out.put_u32(1);
    out.put_u32(2);
    out.extend_from_slice(image);
    out.freeze()
}

/// Binary type 4: `u32 type, u32 metadata length, metadata JSON, image`,
/// the JSON spaced the way Python's json.dumps writes it.
fn preview_with_metadata(node: &str, prompt_id: &str, image: &Bytes) -> Bytes {
    let quote = |s: &str| Value::from(s).to_string();
    let metadata = format!(
        "{{\"node_id\": {n}, \"prompt_id\": {p}, \"display_node_id\": {n}, \
         \"parent_node_id\": null, \"real_node_id\": {n}, \"image_type\": \"image/png\"}}",
        n = quote(node),
        p = quote(prompt_id)
    );
    let mut out = BytesMut::with_capacity(image.len() + metadata.len() + 8);
    out.put_u32(4);
    out.put_u32(metadata.len() as u32);
    out.extend_from_slice(metadata.as_bytes());
    out.extend_from_slice(image);
    out.freeze()
}
