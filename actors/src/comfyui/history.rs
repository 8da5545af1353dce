//! What ComfyUI's REST answers mean: history entries, their outputs, the queue, system stats.
//!
//! Everything is read leniently from `serde_json::Value`: fields differ between ComfyUI
//! versions (a queue `number` can be a float, node ids numbers), and a missing field must
//! degrade to "unknown", never to a failed job.

use std::collections::BTreeMap;

use serde_json::Value;

use super::events::{node_id, parse_message, ComfyEvent, ExecutionErrorEvent};
use super::job::EXTRA_DATA_PROMPT_ID;
use crate::artifact::{classify_filename, ArtifactKind};

/// A finished (or failed) prompt, from `GET /history/{id}`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub prompt_id: String,
    /// `success` or `error`; `None` when the server sent no status.
    pub status_str: Option<String>,
    pub completed: bool,
    /// The status messages (`execution_start`, `execution_error`, ...), parsed as events.
    pub messages: Vec<ComfyEvent>,
    /// `outputs` as sent: `{node_id: {images: [...], gifs: [...], ...}}`.
    pub outputs: Value,
}

/// One file a prompt produced, as listed in its outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// The output node that produced it.
    pub node_id: String,
    pub filename: String,
    pub subfolder: String,
    /// ComfyUI's folder type: `output`, `temp` (previews) or `input`.
    pub folder_type: String,
    /// What the file holds, from the output key, the `animated` flag and the extension.
    pub kind: ArtifactKind,
    pub mime: String,
}

/// Running and pending prompt ids, from `GET /queue`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueState {
    pub running: Vec<String>,
    pub pending: Vec<String>,
    /// Our prompt id as each entry's `extra_data` carries it ([`EXTRA_DATA_PROMPT_ID`]), by
    /// the id the server runs the entry under: the only link between the two on a server
    /// that minted its own id, when its answer to the POST was never recorded.
    pub ours_by_id: BTreeMap<String, String>,
}

impl QueueState {
    pub fn contains(&self, prompt_id: &str) -> bool {
        self.running
            .iter()
            .chain(&self.pending)
            .any(|id| id == prompt_id)
    }

    pub fn is_running(&self, prompt_id: &str) -> bool {
        self.running.iter().any(|id| id == prompt_id)
    }

    /// The server's ids of the entries that are our prompt `ours`: named so, carrying it in
    /// their extra data, or named `server_id`. Running ones first. More than one means it
    /// was posted again (after the server forgot it) before the new answer was recorded.
    pub fn entries_of(&self, ours: &str, server_id: Option<&str>) -> Vec<String> {
        self.running
            .iter()
            .chain(&self.pending)
            .filter(|id| {
                id.as_str() == ours
                    || Some(id.as_str()) == server_id
                    || self.ours_by_id.get(id.as_str()).map(String::as_str) == Some(ours)
            })
            .cloned()
            .collect()
    }
}

/// Health and capacity, from `GET /system_stats`.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemStats {
    pub comfyui_version: Option<String>,
    pub devices: Vec<Device>,
    /// The whole answer, for operators.
    pub raw: Value,
}

/// One compute device of a ComfyUI server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    /// `cuda`, `cpu`, ...
    pub device_type: String,
    pub vram_total: u64,
    pub vram_free: u64,
}

impl HistoryEntry {
    /// Reads the entry for `prompt_id` from a `/history/{id}` answer; `{}` (still queued or
    /// running, or unknown to the server) gives `None`.
    pub fn from_answer(prompt_id: &str, answer: &Value) -> Option<HistoryEntry> {
        let entry = answer.get(prompt_id)?;
        let status = entry.get("status").cloned().unwrap_or(Value::Null);
        let messages = status
            .get("messages")
            .and_then(Value::as_array)
            .map(|messages| {
                messages
                    .iter()
                    .filter_map(|message| {
                        let kind = message.get(0)?.as_str()?;
                        Some(parse_message(kind, message.get(1).unwrap_or(&Value::Null)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(HistoryEntry {
            prompt_id: prompt_id.to_string(),
            status_str: status
                .get("status_str")
                .and_then(Value::as_str)
                .map(str::to_string),
            completed: status
                .get("completed")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            messages,
            outputs: entry.get("outputs").cloned().unwrap_or(Value::Null),
        })
    }

    /// Finds, in a `/history?max_items=N` answer, the entry of our prompt `ours`: under our
    /// id, or under the server's with our id in the extra data of its prompt tuple
    /// (`[number, id, prompt, extra_data, outputs]`). Gives the server's id and the entry.
    pub fn find_ours(ours: &str, answer: &Value) -> Option<(String, HistoryEntry)> {
        let entries = answer.as_object()?;
        let (id, _) = entries.iter().find(|(id, entry)| {
            id.as_str() == ours || entry.pointer("/prompt/3").and_then(tagged_id) == Some(ours)
        })?;
        Some((id.clone(), HistoryEntry::from_answer(id, answer)?))
    }

    pub fn is_error(&self) -> bool {
        self.status_str.as_deref() == Some("error")
    }

    /// The `execution_error` among the status messages, if any.
    pub fn execution_error(&self) -> Option<&ExecutionErrorEvent> {
        self.messages.iter().find_map(|message| match message {
            ComfyEvent::ExecutionError(err) => Some(err),
            _ => None,
        })
    }

    /// Whether the status messages record an interruption.
    pub fn was_interrupted(&self) -> Option<(Option<String>, Option<String>)> {
        self.messages.iter().find_map(|message| match message {
            ComfyEvent::ExecutionInterrupted {
                node_id, node_type, ..
            } => Some((node_id.clone(), node_type.clone())),
            _ => None,
        })
    }

    /// Every file in the outputs, previews included, ordered by node id then position.
    pub fn output_files(&self) -> Vec<OutputFile> {
        let Some(outputs) = self.outputs.as_object() else {
            return Vec::new();
        };
        let mut nodes: Vec<(&String, &Value)> = outputs.iter().collect();
        // Independent output nodes finish in no fixed order; numeric ids sort numerically.
        nodes.sort_by(|(a, _), (b, _)| {
            (a.parse::<u64>().ok(), a.as_str()).cmp(&(b.parse::<u64>().ok(), b.as_str()))
        });
        let mut files = Vec::new();
        for (node, output) in nodes {
            let Some(output) = output.as_object() else {
                continue;
            };
            let animated = output
                .get("animated")
                .and_then(Value::as_array)
                .is_some_and(|flags| flags.iter().any(|flag| flag.as_bool() == Some(true)));
            for (key, list) in output {
                let Some(list) = list.as_array() else {
                    continue;
                };
                for item in list {
                    if let Some(file) = output_file(node, key, item, animated) {
                        files.push(file);
                    }
                }
            }
        }
        files
    }

    /// The files worth delivering: everything but `temp` previews.
    pub fn deliverables(&self) -> Vec<OutputFile> {
        self.output_files()
            .into_iter()
            .filter(|file| file.folder_type != "temp")
            .collect()
    }
}

fn output_file(node: &str, key: &str, item: &Value, animated: bool) -> Option<OutputFile> {
    let filename = item.get("filename")?.as_str()?.to_string();
    let (by_extension, mime) = classify_filename(&filename);
    let ext = filename
        .rsplit('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let video_ext = matches!(
        ext.as_str(),
        "gif" | "webp" | "mp4" | "webm" | "mov" | "mkv"
    );
    let kind = if animated || matches!(key, "gifs" | "videos" | "video") || video_ext {
        ArtifactKind::Video
    } else {
        by_extension
    };
    // SaveAnimatedPNG writes APNG: players and browsers animate it only under its own type.
    let mime = if kind == ArtifactKind::Video && ext == "png" {
        "image/apng"
    } else {
        mime
    };
    Some(OutputFile {
        node_id: node.to_string(),
        filename,
        subfolder: item
            .get("subfolder")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        folder_type: item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("output")
            .to_string(),
        kind,
        mime: mime.to_string(),
    })
}

/// Our prompt id in a prompt's `extra_data`, if it carries one.
fn tagged_id(extra_data: &Value) -> Option<&str> {
    extra_data.get(EXTRA_DATA_PROMPT_ID)?.as_str()
}

impl QueueState {
    /// Reads a `/queue` answer: entries are `[number, prompt_id, prompt, extra_data,
    /// outputs_to_execute, ...]`.
    pub fn from_answer(answer: &Value) -> QueueState {
        let mut ours_by_id = BTreeMap::new();
        let mut ids = |key: &str| -> Vec<String> {
            let entries = answer.get(key).and_then(Value::as_array);
            let mut ids = Vec::new();
            for entry in entries.into_iter().flatten() {
                let Some(id) = entry.get(1).and_then(node_id) else {
                    continue;
                };
                if let Some(ours) = entry.get(3).and_then(tagged_id) {
                    ours_by_id.insert(id.clone(), ours.to_string());
                }
                ids.push(id);
            }
            ids
        };
        let running = ids("queue_running");
        let pending = ids("queue_pending");
        QueueState {
            running,
            pending,
            ours_by_id,
        }
    }
}

impl SystemStats {
    pub fn from_answer(answer: Value) -> SystemStats {
        let devices = answer
            .get("devices")
            .and_then(Value::as_array)
            .map(|devices| {
                devices
                    .iter()
                    .map(|d| Device {
                        name: d.get("name").and_then(Value::as_str).unwrap_or("").into(),
                        device_type: d.get("type").and_then(Value::as_str).unwrap_or("").into(),
                        vram_total: d.get("vram_total").and_then(Value::as_u64).unwrap_or(0),
                        vram_free: d.get("vram_free").and_then(Value::as_u64).unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        SystemStats {
            comfyui_version: answer
                .pointer("/system/comfyui_version")
                .and_then(Value::as_str)
                .map(str::to_string),
            devices,
            raw: answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn history_success_from_a_basic() {
        let answer = json!({"a3e3": {
            "prompt": [0, "a3e3", {}, {"client_id": "c"}, ["3"]],
            "outputs": {"3": {"images": [
                {"filename": "rec_a_00001_.png", "subfolder": "", "type": "output"}]}},
            "status": {"status_str": "success", "completed": true, "messages": [
                ["execution_start", {"prompt_id": "a3e3", "timestamp": 1}],
                ["execution_cached", {"nodes": [], "prompt_id": "a3e3", "timestamp": 1}],
                ["execution_success", {"prompt_id": "a3e3", "timestamp": 1}]]},
            "meta": {}}});
        let entry = HistoryEntry::from_answer("a3e3", &answer).expect("entry");
        assert!(!entry.is_error());
        assert!(entry.completed);
        assert_eq!(entry.messages.len(), 3);
        let files = entry.deliverables();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].filename, "rec_a_00001_.png");
        assert_eq!(files[0].kind, ArtifactKind::Image);
        assert_eq!(files[0].mime, "image/png");
        assert_eq!(HistoryEntry::from_answer("a3e3", &json!({})), None);
    }

    #[test]
    fn history_error_from_g_exec_error() {
        let answer = json!({"bf2c": {"outputs": {}, "status": {"status_str": "error",
            "completed": false, "messages": [
                ["execution_start", {"prompt_id": "bf2c"}],
                ["execution_error", {"prompt_id": "bf2c", "node_id": "4",
                    "node_type": "ImageBatch", "exception_message": "Sizes of tensors",
                    "exception_type": "RuntimeError", "traceback": ["line"]}]]}}});
        let entry = HistoryEntry::from_answer("bf2c", &answer).expect("entry");
        assert!(entry.is_error());
        let err = entry.execution_error().expect("error message");
        assert_eq!(err.node_type.as_deref(), Some("ImageBatch"));
        assert!(entry.was_interrupted().is_none());
        assert!(entry.deliverables().is_empty());
    }

    #[test]
    fn our_prompt_is_found_in_recent_history_by_its_extra_data() {
        // The shape of f_queue's `GET /history?max_items=3`.
        let answer = json!({
            "e481": {"prompt": [23, "e481", {}, {"client_id": "c"}, ["3"]],
                "outputs": {}, "status": {"status_str": "success", "completed": true}},
            "9a2f": {"prompt": [24, "9a2f", {},
                    {"client_id": "c", "multiplex_prompt_id": "ours"}, ["3"]],
                "outputs": {"3": {"images": [
                    {"filename": "m_00001_.png", "subfolder": "", "type": "output"}]}},
                "status": {"status_str": "success", "completed": true, "messages": []}}});
        let (id, entry) = HistoryEntry::find_ours("ours", &answer).expect("found");
        assert_eq!(id, "9a2f");
        assert_eq!(entry.deliverables()[0].filename, "m_00001_.png");
        assert_eq!(
            HistoryEntry::find_ours("e481", &answer).expect("by id").0,
            "e481"
        );
        assert!(HistoryEntry::find_ours("other", &answer).is_none());
        assert!(HistoryEntry::find_ours("ours", &json!([])).is_none());
    }

    #[test]
    fn temp_previews_are_not_deliverables_and_videos_are_typed() {
        let answer = json!({"p": {"outputs": {
            "3": {"images": [
                {"filename": "ComfyUI_temp_paysr_00001_.png", "subfolder": "", "type": "temp"}]},
            "10": {"images": [{"filename": "clip_00001_.webp", "subfolder": "v",
                "type": "output"}], "animated": [true]},
            "9": {"gifs": [{"filename": "clip_00001.mp4", "subfolder": "", "type": "output",
                "format": "video/h264-mp4"}]},
            "11": {"text": ["not a file"]}},
            "status": {"status_str": "success", "completed": true, "messages": []}}});
        let entry = HistoryEntry::from_answer("p", &answer).expect("entry");
        assert_eq!(entry.output_files().len(), 3);
        let files = entry.deliverables();
        let names: Vec<_> = files.iter().map(|f| f.filename.as_str()).collect();
        assert_eq!(names, ["clip_00001.mp4", "clip_00001_.webp"]);
        assert!(files.iter().all(|f| f.kind == ArtifactKind::Video));
        assert_eq!(files[0].mime, "video/mp4");
        assert_eq!(files[1].subfolder, "v");
    }

    #[test]
    fn queue_and_stats() {
        let queue = json!({"queue_running": [[20, "run-1", {}, {}, ["99"]]],
            "queue_pending": [[21, "pend-1", {}, {}, ["3"]], [1000.0, "pend-2", {}, {}, []]]});
        let state = QueueState::from_answer(&queue);
        assert_eq!(state.running, ["run-1"]);
        assert_eq!(state.pending, ["pend-1", "pend-2"]);
        assert!(state.contains("pend-2") && !state.contains("gone"));

        assert!(state.ours_by_id.is_empty());

        // An older server minted its own ids; our id is in the extra data (index 3).
        let queue = json!({"queue_running": [[20, "srv-1", {},
                {"multiplex_prompt_id": "ours-1", "client_id": "c"}, ["99"]]],
            "queue_pending": [[21, "srv-2", {}, {"client_id": "c"}, ["3"]],
                [22, "srv-3", {}, {"multiplex_prompt_id": "ours-1"}, ["3"], {}, {}]]});
        let state = QueueState::from_answer(&queue);
        assert_eq!(state.entries_of("ours-1", None), ["srv-1", "srv-3"]);
        assert_eq!(state.entries_of("ours-2", Some("srv-2")), ["srv-2"]);
        assert!(state.entries_of("ours-2", None).is_empty());
        assert!(state.is_running("srv-1") && !state.is_running("srv-3"));

        let stats = SystemStats::from_answer(json!({"system": {"comfyui_version": "0.3.64"},
            "devices": [{"name": "cpu", "type": "cpu", "index": null,
                "vram_total": 25276071936u64, "vram_free": 24258670592u64}]}));
        assert_eq!(stats.comfyui_version.as_deref(), Some("0.3.64"));
        assert_eq!(stats.devices[0].vram_free, 24258670592);
    }
}
