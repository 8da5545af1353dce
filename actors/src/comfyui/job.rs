//! Running one ComfyUI job: inputs in, prompt submitted, events followed, outputs stored.
//!
//! The sequence follows the recordings: upload each input and inject the name ComfyUI returns;
//! submit with our prompt id and the node's client id; follow that prompt's events until
//! `executing {node: null}` (ComfyUI sends it after storing the history entry; after
//! `execution_success` the wait for it is short); then read `/history/{id}`, which decides
//! (it can still lag, so it is retried briefly); finally stream each output into the store.
//!
//! The events come from the node's shared socket through a broadcast channel. A quiet, lagging
//! or closed channel never makes a job hang: it falls back to polling `/history/{id}` and
//! `/queue`, and a prompt that neither knows is reported [`JobError::Lost`].
//!
//! Every request about a posted prompt uses the id the server answered the POST with: ours
//! on recent servers, one it minted on older ones. [`submit_job`] and [`follow_job`] are the
//! two halves of [`run_job`], so a caller can record that id durably in between. [`locate`]
//! finds the server's id from ours alone (our id travels in the extra data), and
//! [`cancel`] dequeues or interrupts by the server's id, interrupting only what `/queue`
//! shows is ours.
//!
//! [`resume_job`] picks up a prompt posted before a daemon restart or a node reconnect: it
//! posts nothing, looks where the prompt stands and then follows or collects it like
//! [`run_job`]. While following, a node that stops answering is given [`TRANSPORT_GRACE`] to
//! come back, so a ComfyUI restarting quickly ends in a reconciliation (finished, or
//! [`JobError::Lost`] and a resubmission) rather than a failed step.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::broadcast::{self, error::RecvError};
use tracing::{debug, info, warn, Instrument};

use super::client::{ComfyClient, JobLookup};
use super::events::{ComfyEvent, ExecutionErrorEvent};
use super::history::HistoryEntry;
use super::ComfyError;
use crate::artifact::{ArtifactKind, ArtifactMeta};
use crate::store::ArtifactFiles;
use crate::workflow::ComfyJob;

/// With no event for our prompt for this long, ask `/history` and `/queue` where it stands.
/// Only a check, never a failure: a model load or a slow sampler step can be silent for long.
const QUIET_CHECK: Duration = Duration::from_secs(15);

/// ComfyUI stores the history entry between `execution_success` and `executing {node: null}`,
/// so the job waits for the latter; this long at most, for servers that do not send it.
const SUCCESS_GRACE: Duration = Duration::from_millis(500);

/// Polling interval bounds once the event channel is gone.
const POLL_MIN: Duration = Duration::from_millis(250);
const POLL_MAX: Duration = Duration::from_secs(5);

/// History can lag `execution_success`; read it this many times, doubling the pause from
/// `HISTORY_LAG_FIRST_PAUSE` (about 1.5 s in all) before asking the queue.
const HISTORY_LAG_ATTEMPTS: u32 = 6;
const HISTORY_LAG_FIRST_PAUSE: Duration = Duration::from_millis(50);

/// Consecutive checks that find the prompt neither in history nor in the queue before it is
/// declared lost (the server restarted and forgot it).
const UNKNOWN_CHECKS_BEFORE_LOST: u32 = 3;

/// How long a job keeps retrying a node that cannot be reached (connection refused or reset,
/// a 5xx) while it follows a prompt, before failing with [`JobError::Transport`]. Long enough
/// for a ComfyUI process to restart and answer again; after that the prompt is reconciled
/// (found in history, still queued, or [`JobError::Lost`]) instead of the step failing.
pub const TRANSPORT_GRACE: Duration = Duration::from_secs(30);

/// The key under `extra_data` holding our prompt id. Old servers ignore our `prompt_id` and
/// mint their own; the extra data is kept in history and queue entries, so our id can still
/// be matched there.
pub const EXTRA_DATA_PROMPT_ID: &str = "multiplex_prompt_id";

/// How many of the most recently finished prompts [`locate`] reads
/// (`GET /history?max_items=N`). Small on purpose: each entry holds its whole prompt graph
/// and outputs (tens of kilobytes for a large workflow), and the prompt looked for finished
/// while the daemon was down, typically seconds, so among the last few. The bare
/// `/history` list is never read: it grows to hundreds of megabytes.
pub const RECENT_HISTORY_ITEMS: usize = 16;

/// The most of that answer [`locate`] reads; a larger one comes from a server that ignored
/// `max_items`, and is abandoned.
const RECENT_HISTORY_LIMIT: usize = 8 << 20;

/// What a running job reports along the way (not durable; for live views).
#[derive(Debug, Clone, PartialEq)]
pub enum JobProgress {
    /// The prompt is queued under this id.
    Submitted {
        prompt_id: String,
        number: Option<i64>,
    },
    /// ComfyUI accepted the prompt but dropped the outputs these nodes feed (200 with
    /// `node_errors`); the valid branch still runs.
    Warning {
        message: String,
        node_errors: Value,
    },
    Started,
    /// Nodes whose cached results are reused.
    Cached {
        nodes: Vec<String>,
    },
    Executing {
        node: String,
    },
    Progress {
        node: Option<String>,
        value: f64,
        max: f64,
    },
    Preview {
        mime: String,
        bytes: Bytes,
        node: Option<String>,
    },
    /// An output was stored.
    Stored(ArtifactMeta),
}

/// Why a ComfyUI job failed, naming the prompt and, where known, the node.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Refused at submission (400) or unusable as given: deterministic, never retried.
    #[error("prompt {prompt_id} rejected: {message}")]
    Rejected {
        prompt_id: String,
        message: String,
        /// ComfyUI's `error` object, verbatim (`null` when we refused it ourselves).
        error: Value,
        node_errors: Value,
    },
    /// A node raised while running.
    #[error(
        "prompt {prompt_id} failed in node {} ({}): {}{}",
        node_id.as_deref().unwrap_or("?"),
        node_type.as_deref().unwrap_or("unknown class"),
        exception_type.as_deref().map(|t| format!("{t}: ")).unwrap_or_default(),
        message.trim_end()
    )]
    Execution {
        prompt_id: String,
        node_id: Option<String>,
        node_type: Option<String>,
        exception_type: Option<String>,
        message: String,
        traceback: Vec<String>,
    },
    #[error(
        "prompt {prompt_id} interrupted{}",
        node_id.as_deref().map(|n| format!(" at node {n}")).unwrap_or_default()
    )]
    Interrupted {
        prompt_id: String,
        node_id: Option<String>,
    },
    /// The node could not be reached or answered oddly; worth retrying (reconcile first).
    #[error("prompt {prompt_id}: {source}")]
    Transport {
        prompt_id: String,
        source: ComfyError,
    },
    /// The node knows nothing of the prompt (neither queued, running nor in history).
    #[error("prompt {prompt_id} is unknown to ComfyUI at {node_url} (restarted?)")]
    Lost { prompt_id: String, node_url: String },
    /// A local problem: an input file, or the artifact store.
    #[error("prompt {prompt_id}: {source}")]
    Local {
        prompt_id: String,
        source: ComfyError,
    },
}

impl JobError {
    pub fn prompt_id(&self) -> &str {
        match self {
            JobError::Rejected { prompt_id, .. }
            | JobError::Execution { prompt_id, .. }
            | JobError::Interrupted { prompt_id, .. }
            | JobError::Transport { prompt_id, .. }
            | JobError::Lost { prompt_id, .. }
            | JobError::Local { prompt_id, .. } => prompt_id,
        }
    }

    /// A GPU out-of-memory error: worth one retry on a node with more free VRAM, not a loop.
    pub fn is_out_of_memory(&self) -> bool {
        let JobError::Execution {
            exception_type,
            message,
            ..
        } = self
        else {
            return false;
        };
        let message = message.to_ascii_lowercase();
        exception_type
            .as_deref()
            .is_some_and(|t| t.contains("OutOfMemoryError"))
            || message.contains("out of memory")
            || message.contains("allocation on device")
    }

    /// Whether running the job again (after reconciling) may succeed: transport trouble and a
    /// forgotten prompt. Out-of-memory is decided separately by
    /// [`is_out_of_memory`](Self::is_out_of_memory).
    pub fn is_retryable(&self) -> bool {
        matches!(self, JobError::Transport { .. } | JobError::Lost { .. })
    }

    /// Structured details for the user: ComfyUI's `node_errors` of a rejection, or the
    /// failing node and traceback of an execution error.
    pub fn details(&self) -> Option<Value> {
        match self {
            // ComfyUI's answer whole: an unknown class has its reason only in `error`.
            JobError::Rejected {
                error, node_errors, ..
            } => Some(serde_json::json!({"error": error, "node_errors": node_errors})),
            JobError::Execution {
                node_id,
                node_type,
                exception_type,
                traceback,
                ..
            } => Some(serde_json::json!({
                "node_id": node_id,
                "node_type": node_type,
                "exception_type": exception_type,
                "traceback": traceback,
            })),
            _ => None,
        }
    }

    fn from_event(prompt_id: &str, err: &ExecutionErrorEvent) -> JobError {
        JobError::Execution {
            prompt_id: prompt_id.to_string(),
            node_id: err.node_id.clone(),
            node_type: err.node_type.clone(),
            exception_type: err.exception_type.clone(),
            message: err.exception_message.clone(),
            traceback: err.traceback.clone(),
        }
    }
}

/// Runs `job` on the ComfyUI behind `client` and returns the stored outputs: [`submit_job`]
/// then [`follow_job`] under the id the server answered with.
///
/// `events` must have been subscribed to the node's socket before this is called (and the
/// socket must be connected with `client_id`), so no event of the prompt can be missed.
/// `prompt_id` should already be recorded durably with the node (docs/durability.md).
/// A caller that must record the server's id before following (the node does) calls the
/// two halves itself.
pub async fn run_job(
    client: &ComfyClient,
    job: &ComfyJob,
    prompt_id: &str,
    client_id: &str,
    events: broadcast::Receiver<ComfyEvent>,
    files: &ArtifactFiles,
    mut on_progress: impl FnMut(JobProgress),
) -> Result<Vec<ArtifactMeta>, JobError> {
    let server_id = submit_job(client, job, prompt_id, client_id, &mut on_progress).await?;
    let kind = job.output_kind;
    follow_job(client, &server_id, kind, events, files, on_progress).await
}

/// Uploads the job's inputs and posts its prompt under our `prompt_id` (also put in the
/// extra data under [`EXTRA_DATA_PROMPT_ID`]). Returns the id the server runs it under:
/// ours on recent servers, one it minted on older ones, which is the id every later
/// request about the prompt must use (history, jobs, events, cancel).
pub async fn submit_job(
    client: &ComfyClient,
    job: &ComfyJob,
    prompt_id: &str,
    client_id: &str,
    mut on_progress: impl FnMut(JobProgress),
) -> Result<String, JobError> {
    let span = tracing::info_span!("comfy_submit", prompt_id, node_url = %client.base_url());
    async {
        let prompt = prepare_prompt(client, job, prompt_id).await?;
        submit(client, &prompt, prompt_id, client_id, &mut on_progress).await
    }
    .instrument(span)
    .await
}

/// Follows a posted prompt by the id the server runs it under (`server_id`, from
/// [`submit_job`]) to its end and stores its outputs.
pub async fn follow_job(
    client: &ComfyClient,
    server_id: &str,
    output_kind: ArtifactKind,
    events: broadcast::Receiver<ComfyEvent>,
    files: &ArtifactFiles,
    mut on_progress: impl FnMut(JobProgress),
) -> Result<Vec<ArtifactMeta>, JobError> {
    let span = tracing::info_span!("comfy_job", server_id, node_url = %client.base_url());
    async {
        let entry = follow(client, server_id, events, QUIET_CHECK, &mut on_progress).await?;
        let outputs = collect(
            client,
            server_id,
            &entry,
            output_kind,
            files,
            &mut on_progress,
        )
        .await?;
        info!(outputs = outputs.len(), "prompt finished");
        Ok(outputs)
    }
    .instrument(span)
    .await
}

/// Looks, on a server that may run our prompt `ours` under an id of its own, for the id
/// it runs or ran it under, when that id was never recorded (the daemon died between the
/// POST and recording its answer, or posted again after the server forgot it). `None`
/// when neither the queue nor the recent history holds it.
///
/// The queue is read first (running and pending entries, matched by the extra data that
/// carries our id), then the [`RECENT_HISTORY_ITEMS`] most recently finished prompts:
/// ComfyUI moves a prompt from the queue to the history in one step, so one of the two
/// reads sees it. A prompt that finished before those is not found, and is posted again.
pub async fn locate(client: &ComfyClient, ours: &str) -> Result<Option<String>, JobError> {
    let transport = |source| JobError::Transport {
        prompt_id: ours.into(),
        source,
    };
    let queue = patiently(client, || async { client.queue().await.map_err(transport) }).await?;
    if let Some(id) = queue.entries_of(ours, None).into_iter().next() {
        info!(prompt_id = ours, server_id = %id, "our prompt found in the queue");
        return Ok(Some(id));
    }
    let recent = patiently(client, || async {
        client
            .recent_history(RECENT_HISTORY_ITEMS, RECENT_HISTORY_LIMIT)
            .await
            .map_err(transport)
    })
    .await?;
    let Some(recent) = recent else {
        warn!(
            prompt_id = ours,
            "recent history too large to search; the server ignored max_items"
        );
        return Ok(None);
    };
    let found = HistoryEntry::find_ours(ours, &recent).map(|(id, _)| id);
    if let Some(id) = &found {
        info!(prompt_id = ours, server_id = %id, "our prompt found in the recent history");
    }
    Ok(found)
}

/// What [`cancel`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cancelled {
    /// Server ids removed from the pending queue.
    pub dequeued: Vec<String>,
    /// The server id interrupted while it ran.
    pub interrupted: Option<String>,
}

/// Stops our prompt `ours` (run by the server as `server_id` where known): pending
/// entries are deleted from the queue by the server's ids, and `/interrupt {prompt_id}` is
/// sent only while `/queue` shows our prompt running. Older servers ignore the interrupt's
/// body and stop whatever runs, so interrupting without looking could stop another run's
/// prompt. The entries are found by id and by the extra data carrying our id, so a prompt
/// whose server id was never learned is stopped too.
pub async fn cancel(
    client: &ComfyClient,
    ours: &str,
    server_id: Option<&str>,
) -> Result<Cancelled, ComfyError> {
    let queue = client.queue().await?;
    let mut done = Cancelled::default();
    let (running, pending): (Vec<String>, Vec<String>) = queue
        .entries_of(ours, server_id)
        .into_iter()
        .partition(|id| queue.is_running(id));
    let mut running = running.into_iter().next();
    if !pending.is_empty() {
        client.delete_queued(&pending).await?;
        done.dequeued = pending;
        // One may have started between the look and the delete: look again.
        if running.is_none() {
            let queue = client.queue().await?;
            running = queue
                .entries_of(ours, server_id)
                .into_iter()
                .find(|id| queue.is_running(id));
        }
    }
    if let Some(id) = running {
        client.interrupt(&id).await?;
        done.interrupted = Some(id);
    }
    Ok(done)
}

/// Picks up a prompt that may have been posted before (a daemon restart, a node reconnect)
/// and returns its stored outputs, without ever posting anything.
///
/// `prompt_id` is the id the server runs the prompt under: ours, or the one an old server
/// minted (reported by [`JobProgress::Submitted`]). Where the prompt stands decides:
///
/// - in `/history/{id}`: its outputs are collected (or its recorded error returned);
/// - running or pending in `/queue`: it is followed to the end like [`run_job`] does,
///   reporting [`JobProgress::Started`] at once when it is the one running;
/// - neither, [`UNKNOWN_CHECKS_BEFORE_LOST`] looks in a row (well under 2 s): the node forgot
///   it, and [`JobError::Lost`] says that submitting it again is safe.
///
/// `events` should be subscribed to the node's socket before the call, as for [`run_job`].
/// Events reach only the socket whose client id posted the prompt; if the node reconnected
/// under another id, none arrive and the prompt is followed by polling, starting with short
/// pauses since this prompt's events may never come.
pub async fn resume_job(
    client: &ComfyClient,
    prompt_id: &str,
    output_kind: ArtifactKind,
    events: broadcast::Receiver<ComfyEvent>,
    files: &ArtifactFiles,
    mut on_progress: impl FnMut(JobProgress),
) -> Result<Vec<ArtifactMeta>, JobError> {
    let span = tracing::info_span!("comfy_resume", prompt_id, node_url = %client.base_url());
    async {
        let mut unknown_checks = 0;
        let entry = loop {
            match check(client, prompt_id, &mut unknown_checks).await? {
                Standing::Finished(entry) => {
                    info!("prompt finished while we were away; collecting");
                    break *entry;
                }
                Standing::Waiting { running } => {
                    info!(running, "prompt still queued or running; following it");
                    if running {
                        on_progress(JobProgress::Started);
                    }
                    break follow(client, prompt_id, events, POLL_MIN, &mut on_progress).await?;
                }
                // `check` paused already and gives up after enough looks.
                Standing::Unconfirmed => {}
            }
        };
        let outputs = collect(
            client,
            prompt_id,
            &entry,
            output_kind,
            files,
            &mut on_progress,
        )
        .await?;
        info!(outputs = outputs.len(), "resumed prompt finished");
        Ok(outputs)
    }
    .instrument(span)
    .await
}

/// Uploads each input and writes the returned name into the prompt's JSON.
async fn prepare_prompt(
    client: &ComfyClient,
    job: &ComfyJob,
    prompt_id: &str,
) -> Result<Value, JobError> {
    let mut prompt = job.prompt.clone();
    for slot in &job.uploads {
        let uploaded = client
            .upload_image(&slot.path, &slot.filename)
            .await
            .map_err(|err| match err {
                ComfyError::Io { .. } => JobError::Local {
                    prompt_id: prompt_id.into(),
                    source: err,
                },
                other => JobError::Transport {
                    prompt_id: prompt_id.into(),
                    source: other,
                },
            })?;
        let value = Value::String(uploaded.load_image_value());
        inject(&mut prompt, &slot.node_id, &slot.input_name, value).map_err(|message| {
            JobError::Rejected {
                prompt_id: prompt_id.into(),
                message,
                error: Value::Null,
                node_errors: Value::Object(Map::new()),
            }
        })?;
        debug!(node = %slot.node_id, input = %slot.input_name, file = %uploaded.name, "input set");
    }
    Ok(prompt)
}

/// Sets `prompt[node_id]["inputs"][input_name] = value` on the parsed graph.
pub fn inject(
    prompt: &mut Value,
    node_id: &str,
    input_name: &str,
    value: Value,
) -> Result<(), String> {
    let node = prompt
        .get_mut(node_id)
        .and_then(Value::as_object_mut)
        .ok_or_else(|| {
            format!("the workflow has no node {node_id} to receive input {input_name}")
        })?;
    let inputs = node
        .entry("inputs")
        .or_insert_with(|| Value::Object(Map::new()));
    let inputs = inputs
        .as_object_mut()
        .ok_or_else(|| format!("node {node_id} has an `inputs` that is not an object"))?;
    inputs.insert(input_name.to_string(), value);
    Ok(())
}

async fn submit(
    client: &ComfyClient,
    prompt: &Value,
    prompt_id: &str,
    client_id: &str,
    on_progress: &mut impl FnMut(JobProgress),
) -> Result<String, JobError> {
    let mut extra = Map::new();
    extra.insert(EXTRA_DATA_PROMPT_ID.into(), Value::String(prompt_id.into()));
    let accepted = match client
        .submit(prompt, prompt_id, client_id, Some(&extra))
        .await
    {
        Ok(accepted) => accepted,
        Err(ComfyError::Rejected {
            error, node_errors, ..
        }) => {
            let message = super::rejection_summary(&error, &node_errors);
            warn!(%message, "prompt rejected");
            return Err(JobError::Rejected {
                prompt_id: prompt_id.into(),
                message,
                error: *error,
                node_errors: *node_errors,
            });
        }
        Err(source) => {
            return Err(JobError::Transport {
                prompt_id: prompt_id.into(),
                source,
            })
        }
    };
    if accepted.prompt_id != prompt_id {
        // Older servers mint their own id; follow theirs.
        warn!(server_prompt_id = %accepted.prompt_id, "ComfyUI ignored our prompt id");
    }
    on_progress(JobProgress::Submitted {
        prompt_id: accepted.prompt_id.clone(),
        number: accepted.number,
    });
    if !accepted.node_errors.is_empty() {
        let node_errors = Value::Object(accepted.node_errors);
        let message = format!(
            "some outputs were dropped: {}",
            super::rejection_summary(&Value::Null, &node_errors)
        );
        warn!(%message, "prompt accepted with node errors");
        on_progress(JobProgress::Warning {
            message,
            node_errors,
        });
    }
    Ok(accepted.prompt_id)
}

/// How following the events ended.
enum Signal {
    /// The events say the prompt is done (success or `executing null`).
    Done,
    /// The channel went away; poll from here on.
    Poll,
}

/// Follows the prompt until its history entry says how it ended.
async fn follow(
    client: &ComfyClient,
    prompt_id: &str,
    mut events: broadcast::Receiver<ComfyEvent>,
    first_quiet: Duration,
    on_progress: &mut impl FnMut(JobProgress),
) -> Result<HistoryEntry, JobError> {
    // Whether ComfyUI is executing our prompt right now: type 1 previews and `executing`
    // resent after a reconnect carry no prompt id and belong to whatever runs.
    let mut ours_running = false;
    let mut unknown_checks = 0;
    let mut succeeded = false;
    // After a reconnect (or when resuming) the prompt's events may be gone for good; check
    // with a growing pause until one of its events shows up again.
    let mut quiet = first_quiet;
    let signal = loop {
        let wait = if succeeded { SUCCESS_GRACE } else { quiet };
        let event = match tokio::time::timeout(wait, events.recv()).await {
            Ok(Ok(event)) => event,
            Ok(Err(RecvError::Lagged(missed))) => {
                // The receiver goes on from the oldest retained event; the end may be lost.
                warn!(missed, "event channel lagged; checking history");
                match check(client, prompt_id, &mut unknown_checks).await? {
                    Standing::Finished(entry) => return Ok(*entry),
                    _ => continue,
                }
            }
            Ok(Err(RecvError::Closed)) => {
                warn!("event channel closed; polling");
                break Signal::Poll;
            }
            Err(_) if succeeded => break Signal::Done,
            Err(_quiet) => {
                debug!("no event for a while; checking history");
                match check(client, prompt_id, &mut unknown_checks).await? {
                    Standing::Finished(entry) => return Ok(*entry),
                    _ => {
                        quiet = (quiet * 2).min(QUIET_CHECK);
                        continue;
                    }
                }
            }
        };
        let named = event.prompt_id();
        let ours = named == Some(prompt_id) || (named.is_none() && ours_running);
        if named == Some(prompt_id) {
            quiet = QUIET_CHECK;
        }
        match event {
            // Only the first status of a connection has `sid`: the node's socket reconnected.
            ComfyEvent::Status { sid: Some(_), .. } => {
                debug!("event socket reconnected; checking history");
                let standing = check(client, prompt_id, &mut unknown_checks).await?;
                if let Standing::Finished(entry) = standing {
                    return Ok(*entry);
                }
                quiet = POLL_MIN;
            }
            ComfyEvent::ExecutionStart { prompt_id: ref id } => {
                ours_running = id == prompt_id;
                if ours_running {
                    on_progress(JobProgress::Started);
                }
            }
            ComfyEvent::ExecutionCached { nodes, .. } if ours => {
                on_progress(JobProgress::Cached { nodes });
            }
            ComfyEvent::Executing {
                node: Some(node),
                prompt_id: id,
            } => {
                if id.is_some() {
                    ours_running = ours;
                }
                if ours {
                    debug!(node = %node, "executing");
                    on_progress(JobProgress::Executing { node });
                }
            }
            ComfyEvent::Executing { node: None, .. } if named == Some(prompt_id) => {
                break Signal::Done;
            }
            ComfyEvent::ExecutionSuccess { .. } if ours => succeeded = true,
            ComfyEvent::Progress {
                node, value, max, ..
            } if ours => {
                on_progress(JobProgress::Progress { node, value, max });
            }
            ComfyEvent::Preview(preview) if ours => {
                on_progress(JobProgress::Preview {
                    mime: preview.mime,
                    bytes: preview.image,
                    node: preview.node_id,
                });
            }
            ComfyEvent::ExecutionError(err) if named == Some(prompt_id) => {
                let error = JobError::from_event(prompt_id, &err);
                warn!(node = ?err.node_id, class = ?err.node_type, "{error}");
                return Err(error);
            }
            ComfyEvent::ExecutionInterrupted { node_id, .. } if named == Some(prompt_id) => {
                warn!(node = ?node_id, "prompt interrupted");
                return Err(JobError::Interrupted {
                    prompt_id: prompt_id.into(),
                    node_id,
                });
            }
            _ => {}
        }
    };

    match signal {
        Signal::Done => finished_entry(client, prompt_id).await,
        Signal::Poll => poll(client, prompt_id).await,
    }
}

/// Reads the history of a prompt the events say is done, allowing for history lag.
async fn finished_entry(client: &ComfyClient, prompt_id: &str) -> Result<HistoryEntry, JobError> {
    let mut pause = HISTORY_LAG_FIRST_PAUSE;
    for _ in 0..HISTORY_LAG_ATTEMPTS {
        if let Some(entry) = patiently(client, || history(client, prompt_id)).await? {
            return Ok(entry);
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    debug!("history still empty after the end event; polling");
    poll(client, prompt_id).await
}

/// Polls history and queue (with a growing pause) until the prompt ends or is lost.
async fn poll(client: &ComfyClient, prompt_id: &str) -> Result<HistoryEntry, JobError> {
    let mut pause = POLL_MIN;
    let mut unknown_checks = 0;
    loop {
        if let Standing::Finished(entry) = check(client, prompt_id, &mut unknown_checks).await? {
            return Ok(*entry);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// Where a prompt stands after one look at the node.
enum Standing {
    /// In history: finished, well or not (boxed: an entry is large next to the others).
    Finished(Box<HistoryEntry>),
    /// In the queue, executing now or waiting.
    Waiting { running: bool },
    /// Neither, not (yet) often enough in a row to call it lost.
    Unconfirmed,
}

/// One look at where the prompt stands, riding out a node that is briefly unreachable
/// ([`TRANSPORT_GRACE`]). [`JobError::Lost`] once the prompt has been unknown
/// [`UNKNOWN_CHECKS_BEFORE_LOST`] times in a row; an unconfirmed look pauses [`POLL_MIN`]
/// before returning, so callers can simply look again.
async fn check(
    client: &ComfyClient,
    prompt_id: &str,
    unknown_checks: &mut u32,
) -> Result<Standing, JobError> {
    let standing = patiently(client, || look(client, prompt_id)).await?;
    if !matches!(standing, Standing::Unconfirmed) {
        *unknown_checks = 0;
        return Ok(standing);
    }
    *unknown_checks += 1;
    if *unknown_checks >= UNKNOWN_CHECKS_BEFORE_LOST {
        warn!("prompt neither queued nor in history");
        return Err(JobError::Lost {
            prompt_id: prompt_id.into(),
            node_url: client.base_url().to_string(),
        });
    }
    tokio::time::sleep(POLL_MIN).await;
    Ok(Standing::Unconfirmed)
}

/// `/api/jobs/{id}` where the server has it; else history, then queue, then history again
/// (the prompt may finish between the two).
async fn look(client: &ComfyClient, prompt_id: &str) -> Result<Standing, JobError> {
    let transport = |source| JobError::Transport {
        prompt_id: prompt_id.into(),
        source,
    };
    match client.job(prompt_id).await.map_err(transport)? {
        JobLookup::Finished(entry) => return Ok(Standing::Finished(entry)),
        JobLookup::Running => return Ok(Standing::Waiting { running: true }),
        JobLookup::Pending => return Ok(Standing::Waiting { running: false }),
        JobLookup::Unknown => return Ok(Standing::Unconfirmed),
        JobLookup::Unsupported => {}
    }
    if let Some(entry) = history(client, prompt_id).await? {
        return Ok(Standing::Finished(Box::new(entry)));
    }
    let queue = client.queue().await.map_err(|source| JobError::Transport {
        prompt_id: prompt_id.into(),
        source,
    })?;
    if queue.contains(prompt_id) {
        let running = queue.running.iter().any(|id| id == prompt_id);
        return Ok(Standing::Waiting { running });
    }
    match history(client, prompt_id).await? {
        Some(entry) => Ok(Standing::Finished(Box::new(entry))),
        None => Ok(Standing::Unconfirmed),
    }
}

/// Runs `ask` until it succeeds, fails for good, or the node has been unreachable for
/// [`TRANSPORT_GRACE`]: transient transport errors are retried with a growing pause.
async fn patiently<T, F, Fut>(client: &ComfyClient, mut ask: F) -> Result<T, JobError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, JobError>>,
{
    let since = Instant::now();
    let mut pause = POLL_MIN;
    loop {
        match ask().await {
            Err(JobError::Transport { source, .. })
                if source.is_transient() && since.elapsed() + pause < TRANSPORT_GRACE =>
            {
                warn!(cause = %source, node_url = %client.base_url(), "node unreachable; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(POLL_MAX);
            }
            other => return other,
        }
    }
}

async fn history(client: &ComfyClient, prompt_id: &str) -> Result<Option<HistoryEntry>, JobError> {
    client
        .history(prompt_id)
        .await
        .map_err(|source| JobError::Transport {
            prompt_id: prompt_id.into(),
            source,
        })
}

/// Turns a history entry into stored artifacts, or into the error it records.
async fn collect(
    client: &ComfyClient,
    prompt_id: &str,
    entry: &HistoryEntry,
    expected: ArtifactKind,
    files: &ArtifactFiles,
    on_progress: &mut impl FnMut(JobProgress),
) -> Result<Vec<ArtifactMeta>, JobError> {
    if entry.is_error() {
        if let Some(err) = entry.execution_error() {
            return Err(JobError::from_event(prompt_id, err));
        }
        if let Some((node_id, _)) = entry.was_interrupted() {
            return Err(JobError::Interrupted {
                prompt_id: prompt_id.into(),
                node_id,
            });
        }
        return Err(JobError::Execution {
            prompt_id: prompt_id.into(),
            node_id: None,
            node_type: None,
            exception_type: None,
            message: "ComfyUI recorded the prompt as failed without saying why".into(),
            traceback: Vec::new(),
        });
    }
    let deliverables = entry.deliverables();
    if deliverables.is_empty() {
        warn!("prompt finished without any saved output");
    }
    let mut stored = Vec::with_capacity(deliverables.len());
    for output in deliverables {
        // The extension decides; an unknown one takes the kind the step expects.
        let kind = if output.kind == ArtifactKind::Data {
            expected
        } else {
            output.kind
        };
        let meta = client
            .download(&output, files, kind)
            .await
            .map_err(|err| match err {
                ComfyError::Store { .. } => JobError::Local {
                    prompt_id: prompt_id.into(),
                    source: err,
                },
                other => JobError::Transport {
                    prompt_id: prompt_id.into(),
                    source: other,
                },
            })?;
        on_progress(JobProgress::Stored(meta.clone()));
        stored.push(meta);
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn inject_sets_the_input_on_parsed_json() {
        let mut prompt = json!({"1": {"class_type": "LoadImage", "inputs": {"image": "$input"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}});
        inject(&mut prompt, "1", "image", json!("rec_input (1).png")).unwrap();
        assert_eq!(prompt["1"]["inputs"]["image"], "rec_input (1).png");
        assert_eq!(prompt["2"]["inputs"]["images"], json!(["1", 0]));
        assert!(inject(&mut prompt, "9", "image", json!("x"))
            .unwrap_err()
            .contains("node 9"));
    }

    #[test]
    fn errors_name_node_class_and_message() {
        let err = JobError::Execution {
            prompt_id: "p1".into(),
            node_id: Some("4".into()),
            node_type: Some("ImageBatch".into()),
            exception_type: Some("RuntimeError".into()),
            message: "Sizes of tensors must match\n".into(),
            traceback: vec![],
        };
        assert_eq!(
            err.to_string(),
            "prompt p1 failed in node 4 (ImageBatch): RuntimeError: Sizes of tensors must match"
        );
        assert!(!err.is_out_of_memory() && !err.is_retryable());
        let oom = JobError::Execution {
            prompt_id: "p1".into(),
            node_id: Some("3".into()),
            node_type: Some("KSampler".into()),
            exception_type: Some("torch.OutOfMemoryError".into()),
            message: "CUDA out of memory. Tried to allocate 2.00 GiB".into(),
            traceback: vec![],
        };
        assert!(oom.is_out_of_memory());
        let alloc = JobError::Execution {
            prompt_id: "p1".into(),
            node_id: None,
            node_type: None,
            exception_type: Some("RuntimeError".into()),
            message: "Allocation on device 0 would exceed allowed memory".into(),
            traceback: vec![],
        };
        assert!(alloc.is_out_of_memory());
        let lost = JobError::Lost {
            prompt_id: "p1".into(),
            node_url: "http://gpu1/".into(),
        };
        assert!(lost.is_retryable());
        assert_eq!(
            JobError::Interrupted {
                prompt_id: "p1".into(),
                node_id: Some("11".into())
            }
            .to_string(),
            "prompt p1 interrupted at node 11"
        );
    }
}
