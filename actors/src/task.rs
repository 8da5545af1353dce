//! Tasks: the unit of work a run hands to the scheduler and the scheduler hands to a node.

use actix::prelude::*;

use crate::artifact::ArtifactMeta;
use crate::store::StepError;
use crate::workflow::{ComfyJob, LangflowJob, Requirement};

/// The remote part of a step, rendered and ready to send.
#[derive(Debug, Clone)]
pub enum RemoteJob {
    Comfy(ComfyJob),
    Langflow(LangflowJob),
}

/// Identifies one attempt of one step of one run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskKey {
    pub run_id: String,
    pub step_id: String,
    pub attempt: u32,
}

impl std::fmt::Display for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}#{}", self.run_id, self.step_id, self.attempt)
    }
}

/// A step ready to run somewhere.
#[derive(Clone)]
pub struct Task {
    pub key: TaskKey,
    pub requirement: Requirement,
    pub job: RemoteJob,
    /// Our id for the remote work (a ComfyUI prompt id or a LangFlow session id), recorded in
    /// the store before the task was queued.
    pub remote_id: String,
    /// The id the service runs the work under when it is not ours (older ComfyUI mints its
    /// own), as recorded with the step; `None` while unknown.
    pub server_id: Option<String>,
    /// Where progress and the outcome go.
    pub updates: Recipient<TaskUpdate>,
    /// Asked, and awaited, before the node sends anything remote: the run records the node.
    pub placement: Recipient<ConfirmPlacement>,
    /// Asked, and awaited, before the node follows work the service took under an id of its
    /// own: the run records that id, so a restart and a cancel use it.
    pub server_ids: Recipient<RecordServerId>,
    /// The work may already have been sent (before a restart or while a node was away): the
    /// node first asks its service where the work stands, and sends it only if the service
    /// does not know it.
    pub resume: bool,
    /// Run only on this node: the one the work was sent to. The scheduler lets go of the pin
    /// once the node has been away longer than the grace period.
    pub pinned_node: Option<String>,
    /// The node the pin was let go of: it may still hold the work (queued, running, done),
    /// so it stays a candidate, preferred when it is back, and a placement there sets
    /// `resume` to look the work up before sending anything. Set only by the scheduler.
    pub left_node: Option<String>,
    /// Nodes not to use for this attempt, e.g. one that just ran out of memory on it.
    pub avoid_nodes: Vec<String>,
    /// Only nodes with more free VRAM than this node had: the retry after out-of-memory.
    pub more_vram_than: Option<String>,
    /// The lease the run was submitted under: the task runs only on its nodes while it
    /// lives (see [`crate::lease`]).
    pub lease: Option<String>,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("key", &self.key)
            .field("remote_id", &self.remote_id)
            .field("server_id", &self.server_id)
            .finish()
    }
}

/// Sent by a node to the run before it submits anything; the run persists the placement and
/// answers once it is durable, so a restart knows where the work went.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct ConfirmPlacement {
    pub key: TaskKey,
    pub node: String,
}

/// Sent by a node once a service answered with an id of its own for the work (or the node
/// found it under one); the run records it with the step and answers once it is durable.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct RecordServerId {
    pub key: TaskKey,
    pub server_id: String,
}

/// What a node reports about a task.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct TaskUpdate {
    pub key: TaskKey,
    pub node: String,
    pub event: TaskEvent,
}

#[derive(Debug)]
pub enum TaskEvent {
    /// The service accepted the work.
    Submitted,
    /// The service started executing it.
    Started,
    Progress {
        value: f64,
        max: f64,
        detail: Option<String>,
    },
    Preview {
        mime: String,
        bytes: bytes::Bytes,
    },
    Notice(String),
    Succeeded {
        artifacts: Vec<ArtifactMeta>,
    },
    Failed(TaskFailure),
    Cancelled,
}

/// Why a task failed, and what may help.
#[derive(Debug, Clone)]
pub struct TaskFailure {
    pub error: StepError,
    /// Transport errors, lost prompts and unknown outcomes: trying again may work.
    pub retryable: bool,
    /// The node ran out of GPU memory: another node with more free VRAM may manage.
    pub out_of_memory: bool,
    /// The node went away and did not come back in time: the work moves elsewhere, which
    /// is not a failed attempt of the step.
    pub node_lost: bool,
}

impl TaskFailure {
    /// A failure that trying again will not fix.
    pub fn permanent(message: impl Into<String>) -> TaskFailure {
        TaskFailure {
            error: StepError {
                message: message.into(),
                details: None,
            },
            retryable: false,
            out_of_memory: false,
            node_lost: false,
        }
    }

    /// A failure that may go away.
    pub fn transient(message: impl Into<String>) -> TaskFailure {
        TaskFailure {
            retryable: true,
            ..TaskFailure::permanent(message)
        }
    }

    /// The node is gone for longer than the grace period.
    pub fn node_lost(message: impl Into<String>) -> TaskFailure {
        TaskFailure {
            node_lost: true,
            ..TaskFailure::transient(message)
        }
    }
}
