//! Running one task on a node's service: the future a `GpuNode` spawns per task.
//!
//! Every placement is confirmed with the run first, so it is durable before anything is
//! sent or followed: resumed work too, since a retry that comes back to the node it left
//! was queued with no node recorded, and a daemon restart must find it here, not send it
//! anew elsewhere. Fresh work is then sent. Resumed work (after a daemon or node-actor
//! restart, or a node that came back) is first looked up on the service: ComfyUI's queue
//! and history, LangFlow's stored messages. Only work the service does not know is sent
//! again, once, under the same id. Fresh work that the node forgets while it runs (a
//! ComfyUI restart) is sent again the same way. That is what keeps GPU work from being done
//! twice or lost.
//!
//! An older ComfyUI runs a prompt under an id of its own: that id is recorded with the step
//! (and flushed) before the prompt is followed, and a resumed prompt unknown by the ids the
//! step has is looked for by our id in the extra data of the server's queue and recent
//! history before it is sent again.

use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::artifact::{ArtifactKind, ArtifactMeta};
use crate::comfyui::{self, ComfyClient, ComfyEvent, JobError, JobProgress};
use crate::config::FlowConfig;
use crate::langflow::{self, LangflowClient, LangflowError, Recovery};
use crate::store::{ArtifactFiles, StepError};
use crate::task::{
    ConfirmPlacement, RecordServerId, RemoteJob, Task, TaskEvent, TaskFailure, TaskUpdate,
};
use crate::workflow::{ComfyJob, LangflowJob};

/// What a task needs from its node: the services' clients, and where outputs are stored.
pub(super) struct Services {
    pub node: String,
    pub files: ArtifactFiles,
    pub comfy: Option<ComfyService>,
    pub langflow: Option<LangflowService>,
}

pub(super) struct ComfyService {
    pub client: ComfyClient,
    pub client_id: String,
    /// The node's event socket; subscribed to before anything is posted.
    pub events: broadcast::Sender<ComfyEvent>,
    /// Where the task tells its node which id the server runs its prompt under.
    pub server_id: ServerIdCell,
}

/// The id a server runs a task's prompt under, shared between the task's future and its
/// node: a cancel must stop the prompt by the id the server knows, which the future may
/// have learned a moment ago (older ComfyUI mints its own id in the answer to the POST).
#[derive(Clone, Default)]
pub(super) struct ServerIdCell(Arc<Mutex<Option<String>>>);

impl ServerIdCell {
    fn set(&self, id: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(super) struct LangflowService {
    pub client: LangflowClient,
    pub flow: FlowConfig,
}

/// Runs the task and answers its final event. Progress goes to the task's run on the way.
pub(super) async fn execute(task: Task, services: Services) -> TaskEvent {
    if let Err(error) = confirm_placement(&task, &services.node).await {
        return TaskEvent::Failed(TaskFailure {
            error,
            retryable: true,
            out_of_memory: false,
            node_lost: false,
        });
    }
    let outcome = match &task.job {
        RemoteJob::Comfy(job) => match &services.comfy {
            Some(comfy) => run_comfy(&task, job, comfy, &services).await,
            None => Err(TaskFailure::permanent(no_service(
                &services.node,
                "comfyui",
            ))),
        },
        RemoteJob::Langflow(job) => match &services.langflow {
            Some(langflow) => run_langflow(&task, job, langflow, &services).await,
            None => Err(TaskFailure::permanent(no_service(
                &services.node,
                "langflow",
            ))),
        },
    };
    match outcome {
        Ok(artifacts) => TaskEvent::Succeeded { artifacts },
        Err(failure) => TaskEvent::Failed(failure),
    }
}

async fn run_comfy(
    task: &Task,
    job: &ComfyJob,
    comfy: &ComfyService,
    services: &Services,
) -> Result<Vec<ArtifactMeta>, TaskFailure> {
    let ours = task.remote_id.as_str();
    let (client, client_id, files) = (&comfy.client, comfy.client_id.as_str(), &services.files);
    let kind = job.output_kind;
    // The id the server runs the prompt under: ours, or the one an older server minted.
    let mut following = task.server_id.clone().unwrap_or_else(|| ours.to_string());
    comfy.server_id.set(&following);

    // A prompt the node forgot (it restarted) is sent again under the same id, once per
    // execution: what the node lost is not a failed attempt of the step. Forgotten a second
    // time, it fails as retryable and the step's retry policy decides.
    let mut may_resend = true;
    if task.resume {
        let progress = |event| report_progress(task, &services.node, event);
        let events = comfy.events.subscribe();
        match comfyui::resume_job(client, &following, kind, events, files, progress).await {
            Err(JobError::Lost { .. }) => {}
            other => return other.map_err(comfy_failure),
        }
        // Unknown by the id we have: it may run under one we never recorded (the daemon
        // died before recording the server's answer, or posted it again after the server
        // forgot it). Our id in its extra data finds it.
        match comfyui::locate(client, ours).await {
            Ok(Some(found)) => {
                if found != following {
                    adopt(task, comfy, &services.node, ours, &found).await?;
                    following = found;
                }
                let progress = |event| report_progress(task, &services.node, event);
                let events = comfy.events.subscribe();
                match comfyui::resume_job(client, &following, kind, events, files, progress).await {
                    Err(JobError::Lost { .. }) => {}
                    other => return other.map_err(comfy_failure),
                }
            }
            Ok(None) => {}
            Err(err) => return Err(comfy_failure(err)),
        }
        resending(task, &services.node, ours);
        may_resend = false;
    }
    loop {
        let events = comfy.events.subscribe();
        let progress = |event| report_progress(task, &services.node, event);
        let submitted = comfyui::submit_job(client, job, ours, client_id, progress).await;
        let server_id = submitted.map_err(comfy_failure)?;
        if server_id != following {
            adopt(task, comfy, &services.node, ours, &server_id).await?;
        }
        following = server_id;
        let progress = |event| report_progress(task, &services.node, event);
        match comfyui::follow_job(client, &following, kind, events, files, progress).await {
            Err(JobError::Lost { .. }) if may_resend => {
                resending(task, &services.node, ours);
                may_resend = false;
            }
            other => return other.map_err(comfy_failure),
        }
    }
}

/// Makes `server_id` the id the prompt is followed and cancelled by: told to the node at
/// once, and recorded durably with the step before the caller follows the prompt, so a
/// restart does not have to find it again.
async fn adopt(
    task: &Task,
    comfy: &ComfyService,
    node: &str,
    ours: &str,
    server_id: &str,
) -> Result<(), TaskFailure> {
    info!(node = %node, prompt_id = ours, server_id, "following the prompt by the server's id");
    // Known to the node before it is durable: a cancel arriving meanwhile must use it.
    comfy.server_id.set(server_id);
    let record = RecordServerId {
        key: task.key.clone(),
        server_id: server_id.to_string(),
    };
    let message = match task.server_ids.send(record).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(message)) => message,
        Err(_) => "the run stopped before the server's prompt id was recorded".into(),
    };
    Err(TaskFailure::transient(format!(
        "prompt {ours} runs on {node} as {server_id}, which could not be recorded: {message}"
    )))
}

/// Says that a prompt unknown to its node is about to be sent again.
fn resending(task: &Task, node: &str, prompt_id: &str) {
    warn!(node = %node, prompt_id, "prompt unknown to the node; resubmitting");
    let message =
        format!("{node} does not know prompt {prompt_id} (restarted?); submitting it again");
    notice(task, node, message);
}

async fn run_langflow(
    task: &Task,
    job: &LangflowJob,
    langflow: &LangflowService,
    services: &Services,
) -> Result<Vec<ArtifactMeta>, TaskFailure> {
    let (client, flow, session_id) = (&langflow.client, &langflow.flow, task.remote_id.as_str());
    if task.resume {
        match langflow::recover_job(client, job, flow, session_id).await {
            Ok(Recovery::Finished(text)) => {
                info!(node = %services.node, session_id, "flow had finished before the restart");
                return store_text(task, &services.files, text).await;
            }
            Ok(Recovery::NotStarted) => {}
            Ok(Recovery::Unfinished) => notice(
                task,
                &services.node,
                format!("flow call {session_id} never answered; calling it again"),
            ),
            Err(err) => return Err(langflow_failure(err)),
        }
    }
    send(task, &services.node, TaskEvent::Started);
    let text = langflow::run_job(client, job, flow, session_id, |_token| {})
        .await
        .map_err(langflow_failure)?;
    store_text(task, &services.files, text).await
}

async fn store_text(
    task: &Task,
    files: &ArtifactFiles,
    text: String,
) -> Result<Vec<ArtifactMeta>, TaskFailure> {
    let filename = format!("{}.txt", task.key.step_id);
    let mime = "text/plain; charset=utf-8";
    files
        .put_bytes(
            text.into_bytes().into(),
            &filename,
            ArtifactKind::Text,
            mime,
        )
        .await
        .map(|meta| vec![meta])
        .map_err(|err| TaskFailure::transient(err.to_string()))
}

fn comfy_failure(err: JobError) -> TaskFailure {
    TaskFailure {
        retryable: err.is_retryable(),
        out_of_memory: err.is_out_of_memory(),
        node_lost: false,
        error: StepError {
            message: err.to_string(),
            details: err.details(),
        },
    }
}

fn langflow_failure(err: LangflowError) -> TaskFailure {
    TaskFailure {
        retryable: err.is_retryable(),
        out_of_memory: false,
        node_lost: false,
        error: StepError {
            message: err.to_string(),
            details: None,
        },
    }
}

/// Passes the driver's progress on to the run as task events.
fn report_progress(task: &Task, node: &str, progress: JobProgress) {
    let event = match progress {
        // The server's id, when it is not ours, is recorded by `adopt`, which waits for it
        // to be durable; this only moves the step's state.
        JobProgress::Submitted { .. } => TaskEvent::Submitted,
        JobProgress::Started => TaskEvent::Started,
        JobProgress::Progress {
            value,
            max,
            node: detail,
        } => TaskEvent::Progress { value, max, detail },
        JobProgress::Preview { mime, bytes, .. } => TaskEvent::Preview { mime, bytes },
        JobProgress::Warning { message, .. } => TaskEvent::Notice(message),
        _ => return,
    };
    send(task, node, event);
}

fn notice(task: &Task, node: &str, message: String) {
    send(task, node, TaskEvent::Notice(message));
}

fn send(task: &Task, node: &str, event: TaskEvent) {
    task.updates.do_send(TaskUpdate {
        key: task.key.clone(),
        node: node.to_string(),
        event,
    });
}

fn no_service(node: &str, service: &str) -> String {
    format!("node {node} runs no {service}")
}

/// Asks the run to record the placement, and waits until it is durable.
async fn confirm_placement(task: &Task, node: &str) -> Result<(), StepError> {
    let confirm = ConfirmPlacement {
        key: task.key.clone(),
        node: node.to_string(),
    };
    let failed = |message: String| StepError {
        message,
        details: None,
    };
    match task.placement.send(confirm).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => Err(failed(message)),
        Err(_) => Err(failed("the run stopped before the task started".into())),
    }
}
