//! The durable shape of a run and its steps, as stored in sled and served by the REST API.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::artifact::ArtifactMeta;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    /// True once the run can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }
}

/// Where a step stands. `Submitted` means the work was handed to a node's service (a prompt
/// posted, a flow called): after a restart such a step is reconciled with the node, never
/// blindly sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Waiting for its inputs.
    Pending,
    /// Ready, waiting for a node with a free slot.
    Queued,
    /// Placed on a node, which is preparing it (uploading inputs).
    Assigned,
    /// Handed to the node's service.
    Submitted,
    /// The service reported that it started executing.
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Not run because an upstream step failed or the run was cancelled first.
    Skipped,
}

impl StepState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepState::Succeeded | StepState::Failed | StepState::Cancelled | StepState::Skipped
        )
    }
}

/// A step's failure as shown to users: a sentence, plus the service's own error body verbatim
/// where there is one (ComfyUI's `node_errors`, LangFlow's `detail`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepError {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// The handle of work handed to a remote service, recorded before it is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "service", rename_all = "lowercase")]
pub enum RemoteRef {
    Comfyui {
        /// Our id, chosen and recorded before the prompt is posted.
        prompt_id: String,
        /// The id the server runs the prompt under, recorded (and flushed) before the
        /// prompt is followed when it differs from ours: older ComfyUI ignores our id and
        /// mints its own. Absent while unknown or equal to ours.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        server_prompt_id: Option<String>,
    },
    Langflow {
        session_id: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub id: String,
    /// The step type (`image`, `video`, `comfyui`, ...).
    pub kind: String,
    pub state: StepState,
    /// The node the step was placed on, once placed.
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub queued_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// Fraction done, 0.0 to 1.0, while running. Not flushed on every change.
    #[serde(default)]
    pub progress: Option<f32>,
    #[serde(default)]
    pub error: Option<StepError>,
    #[serde(default)]
    pub artifacts: Vec<ArtifactMeta>,
    #[serde(default)]
    pub remote: Option<RemoteRef>,
    /// While the step is queued again after its node failed or went away: the node its
    /// remote work may still be on, asked first wherever the step is placed next. Kept in
    /// the record so that a restart in between checks there too instead of starting over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_first_on: Option<String>,
}

impl StepRecord {
    /// The node whose service may hold this step's remote work: the node it is placed on
    /// while placed, the node it left while queued again to check there first.
    pub fn node_holding_work(&self) -> Option<&str> {
        let placed = matches!(
            self.state,
            StepState::Assigned | StepState::Submitted | StepState::Running
        );
        if placed {
            self.node.as_deref()
        } else {
            self.check_first_on.as_deref()
        }
    }

    pub fn new(id: &str, kind: &str) -> StepRecord {
        StepRecord {
            id: id.to_string(),
            kind: kind.to_string(),
            state: StepState::Pending,
            node: None,
            attempts: 0,
            queued_at: None,
            started_at: None,
            finished_at: None,
            progress: None,
            error: None,
            artifacts: Vec::new(),
            remote: None,
            check_first_on: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// A UUIDv7: unique, and sorting by it sorts by submission time.
    pub id: String,
    pub name: String,
    pub state: RunState,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// Why the run failed or was cancelled, in one sentence.
    #[serde(default)]
    pub error: Option<String>,
    /// The document as submitted, so a restarted daemon can plan it again.
    pub document: serde_json::Value,
    /// Steps in the plan's order.
    pub steps: Vec<StepRecord>,
}

impl RunRecord {
    pub fn step(&self, id: &str) -> Option<&StepRecord> {
        self.steps.iter().find(|step| step.id == id)
    }

    pub fn step_mut(&mut self, id: &str) -> Option<&mut StepRecord> {
        self.steps.iter_mut().find(|step| step.id == id)
    }
}
