//! The ComfyUI driver: REST client, event socket, and running one job end to end.
//!
//! ComfyUI is driven as the recordings in `shared/fixtures/comfyui` show it behaving (0.3.64):
//!
//! - [`client`]: REST calls. We choose each prompt id and send it, so a restarted daemon can
//!   find its work again with `GET /history/{id}` and `GET /queue` (docs/durability.md).
//!   Older servers mint their own id instead: the node records the id they answer with and
//!   uses it for every later request, and [`locate`] finds a prompt whose answer was never
//!   recorded by our id in the extra data of queue and recent history entries.
//! - [`events`]: pure parsing of text and binary socket frames.
//! - [`socket`]: the awc WebSocket a node keeps open, one per ComfyUI server.
//! - [`job`]: upload inputs, submit, follow the events, read the history, store the outputs.
//!   [`resume_job`] picks up a prompt posted before a restart, never posting it again.
//!
//! The event stream is never trusted alone: a job ends by reading `/history/{id}`, and when the
//! socket goes quiet or drops, the job falls back to polling history and queue.

pub mod client;
pub mod events;
pub mod history;
pub mod job;
pub mod socket;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

pub use client::{Accepted, ComfyClient, JobLookup, UploadedImage};
pub use events::{ComfyEvent, ExecutionErrorEvent, Preview};
pub use history::{Device, HistoryEntry, OutputFile, QueueState, SystemStats};
pub use job::{
    cancel, follow_job, locate, resume_job, run_job, submit_job, Cancelled, JobError, JobProgress,
    EXTRA_DATA_PROMPT_ID, RECENT_HISTORY_ITEMS, TRANSPORT_GRACE,
};
pub use socket::{connect_events, EventStream, MAX_FRAME_SIZE};

use crate::store::StoreError;

/// A failed exchange with a ComfyUI server, naming the URL (or prompt, or file) involved.
#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    /// The request did not complete: connection refused, reset, timed out.
    #[error("ComfyUI at {url} unreachable: {source}")]
    Transport { url: String, source: reqwest::Error },
    /// No complete answer within the request's time limit: a server that accepts
    /// connections but never answers, or a connection silently dropped on the way.
    #[error("ComfyUI at {url} timed out: no complete answer within {after:?}")]
    TimedOut { url: String, after: Duration },
    /// An answer with an unexpected status (ComfyUI answers malformed input with a plain-text
    /// 500).
    #[error("ComfyUI at {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    /// `POST /prompt` refused the prompt (400): deterministic, never retried. Both values are
    /// ComfyUI's JSON, verbatim.
    #[error("ComfyUI rejected prompt {prompt_id}: {}", rejection_summary(.error, .node_errors))]
    Rejected {
        prompt_id: String,
        // Boxed: they are rare, and would make every `Result` carrying this error large.
        error: Box<Value>,
        node_errors: Box<Value>,
    },
    /// An answer that is not what the protocol says.
    #[error("unreadable answer from ComfyUI at {url}: {detail}")]
    Decode { url: String, detail: String },
    #[error("ComfyUI socket {url}: {detail}")]
    WebSocket { url: String, detail: String },
    /// The server answered the WebSocket upgrade with an HTTP status instead of switching
    /// protocols (a proxy refusing upgrades, an auth wall): retrying soon will not help.
    #[error("ComfyUI at {url} refused the WebSocket upgrade with HTTP {status}")]
    UpgradeRefused { url: String, status: u16 },
    /// A local file to upload could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An output could not be written to the artifact store.
    #[error("cannot store ComfyUI output {filename}: {source}")]
    Store {
        filename: String,
        source: StoreError,
    },
}

impl ComfyError {
    /// Whether trying again later may succeed (the server or the network had a problem).
    pub fn is_transient(&self) -> bool {
        match self {
            ComfyError::Transport { .. }
            | ComfyError::TimedOut { .. }
            | ComfyError::WebSocket { .. } => true,
            ComfyError::Status { status, .. } => *status >= 500,
            ComfyError::Rejected { .. }
            | ComfyError::UpgradeRefused { .. }
            | ComfyError::Decode { .. }
            | ComfyError::Io { .. }
            | ComfyError::Store { .. } => false,
        }
    }
}

/// `error.message` plus each node's first problem, e.g. `Prompt outputs failed validation
/// (node 2 ImageInvert: Required input is missing: image)`.
pub fn rejection_summary(error: &Value, node_errors: &Value) -> String {
    let text = |value: &Value, key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let mut summary = text(error, "message");
    let details = text(error, "details");
    if !details.is_empty() {
        summary = format!("{summary}: {details}");
    }
    let mut nodes = Vec::new();
    for (node, info) in node_errors.as_object().into_iter().flatten() {
        let class = text(info, "class_type");
        let problems: Vec<String> = info
            .get("errors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|err| {
                let (message, details) = (text(err, "message"), text(err, "details"));
                if details.is_empty() {
                    message
                } else {
                    format!("{message}: {details}")
                }
            })
            .collect();
        nodes.push(format!("node {node} {class}: {}", problems.join("; ")));
    }
    if !nodes.is_empty() {
        summary = format!("{summary} ({})", nodes.join(", "));
    }
    if summary.is_empty() {
        summary = "no reason given".into();
    }
    summary
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// c_invalid: the 400 for a missing required input.
    #[test]
    fn rejection_names_node_class_and_problem() {
        let error = json!({"type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation", "details": "", "extra_info": {}});
        let node_errors = json!({"2": {"errors": [{"type": "required_input_missing",
            "message": "Required input is missing", "details": "image",
            "extra_info": {"input_name": "image"}}], "dependent_outputs": ["3"],
            "class_type": "ImageInvert"}});
        assert_eq!(
            rejection_summary(&error, &node_errors),
            "Prompt outputs failed validation \
             (node 2 ImageInvert: Required input is missing: image)"
        );
        let unknown_class = json!({"type": "invalid_prompt",
            "message": "Cannot execute because node NoSuchNodeXYZ does not exist.",
            "details": "Node ID '#2'", "extra_info": {}});
        assert_eq!(
            rejection_summary(&unknown_class, &json!({})),
            "Cannot execute because node NoSuchNodeXYZ does not exist.: Node ID '#2'"
        );
    }
}
