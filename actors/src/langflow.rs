//! The LangFlow driver: run flows by id or endpoint name, streamed or not, with files.
//!
//! Shaped by the LangFlow 1.13 recordings in `shared/fixtures/langflow`:
//!
//! - [`client`]: `POST /api/v1/run/{flow}` (plain and `?stream=true`), file upload, health.
//!   The API key goes in `x-api-key` (a Bearer header is refused) and is never logged.
//! - [`answer`]: pure parsing of run answers, stream events and error bodies.
//! - [`job`]: one narration or generic step: upload files, merge tweaks, run, check session;
//!   and, after a restart, [`recover_job`] reads the session's stored messages to learn
//!   whether a run we may have started already answered.
//!
//! Every run carries our own `session_id` and the answer must echo it: that is how a retried or
//! reconciled step is told apart from someone else's conversation.

pub mod answer;
pub mod client;
pub mod job;

pub use answer::{RunAnswer, SessionMessage, StreamEvent};
pub use client::{LangflowClient, RunRequest};
pub use job::{recover_job, recover_job_within, run_job, Recovery, RECOVERY_WAIT};

/// A failed LangFlow call, naming the flow involved.
#[derive(Debug, thiserror::Error)]
pub enum LangflowError {
    /// 404: no flow with this id or endpoint name.
    #[error("LangFlow has no flow {flow}")]
    NotFound { flow: String },
    /// 401/403: missing or wrong API key, or a flow of another user.
    #[error("LangFlow refused access to flow {flow}: {detail}")]
    Forbidden { flow: String, detail: String },
    /// 400: a malformed run request (for instance input_value sent twice).
    #[error("LangFlow rejected the request for flow {flow}: {detail}")]
    BadRequest { flow: String, detail: String },
    /// 422: the body failed LangFlow's validation.
    #[error("LangFlow could not validate the request for flow {flow}: {detail}")]
    Validation { flow: String, detail: String },
    /// Another error status; `detail` is LangFlow's message (decoded when it is JSON inside a
    /// string, as when a component raises).
    #[error("flow {flow} failed ({status}): {detail}")]
    Server {
        flow: String,
        status: u16,
        detail: String,
    },
    /// The flow reported an error in its event stream.
    #[error("flow {flow} failed: {message}")]
    Flow { flow: String, message: String },
    /// A gateway error without a LangFlow body (a proxy's timeout): the flow may have run.
    #[error("outcome of flow {flow} unknown: a proxy answered {status}")]
    UnknownOutcome { flow: String, status: u16 },
    /// The request did not complete, or the stream stopped before its `end` event.
    #[error("LangFlow at {url} unreachable while running {flow}: {detail}")]
    Transport {
        flow: String,
        url: String,
        detail: String,
    },
    /// The answer is for another session than the one we sent.
    #[error("flow {flow} answered for session {got:?}, not ours ({sent})")]
    SessionMismatch {
        flow: String,
        sent: String,
        got: Option<String>,
    },
    /// The answer is not what the protocol says.
    #[error("unreadable answer from flow {flow}: {detail}")]
    Decode { flow: String, detail: String },
    /// The step has files but its flow has no component configured to receive them.
    #[error("flow {flow} takes no files: configure its `file_component`")]
    NoFileComponent { flow: String },
    /// A local file to upload could not be read.
    #[error("cannot read {path} for flow {flow}: {source}")]
    Io {
        flow: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl LangflowError {
    /// Whether the same run may succeed later: the server was out of reach, or a proxy
    /// timed out so the outcome is unknown. Errors LangFlow itself reported
    /// (bad flow, key, body, a component raising) are deterministic and are not retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            LangflowError::Transport { .. } | LangflowError::UnknownOutcome { .. } => true,
            LangflowError::Server { status, .. } => *status == 503,
            _ => false,
        }
    }

    /// The flow (id or endpoint name) the error is about.
    pub fn flow(&self) -> &str {
        match self {
            LangflowError::NotFound { flow }
            | LangflowError::Forbidden { flow, .. }
            | LangflowError::BadRequest { flow, .. }
            | LangflowError::Validation { flow, .. }
            | LangflowError::Server { flow, .. }
            | LangflowError::Flow { flow, .. }
            | LangflowError::UnknownOutcome { flow, .. }
            | LangflowError::Transport { flow, .. }
            | LangflowError::SessionMismatch { flow, .. }
            | LangflowError::Decode { flow, .. }
            | LangflowError::NoFileComponent { flow }
            | LangflowError::Io { flow, .. } => flow,
        }
    }
}
