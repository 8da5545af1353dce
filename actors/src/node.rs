//! The `GpuNode` actor: one per configured box, driving its ComfyUI and LangFlow services.
//!
//! It owns the node's service clients and, for ComfyUI, the one event socket every job on
//! the node listens to (ComfyUI sends a client's events only to that client's socket, so one
//! socket per node and client id serves all its prompts). It probes health on a timer, tells
//! the scheduler when it becomes available or unavailable and when a slot frees, and runs the
//! tasks the scheduler places on it, each as a future spawned in its context.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::activity::{Activity, ActivityHub, Publish};
use crate::artifact::ArtifactKind;
use crate::comfyui::{self, ComfyClient, ComfyEvent, JobProgress};
use crate::config::NodeConfig;
use crate::langflow::{self, LangflowClient};
use crate::scheduler::{NodeStatus, Scheduler};
use crate::store::{ArtifactFiles, StepError};
use crate::task::{RemoteJob, Task, TaskEvent, TaskKey, TaskUpdate};

/// How often services are probed for health.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// First wait before reopening a lost ComfyUI socket; doubles up to the cap.
const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// Events buffered per node for jobs that fall behind; a job that lags this far reconciles
/// from ComfyUI's history instead.
const EVENT_BUFFER: usize = 4096;

/// Run a placed task.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunTask(pub Task);

/// Stop a task: interrupt or dequeue its prompt, abort its flow call.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AbortTask(pub TaskKey);

/// The ComfyUI event socket is open and has delivered its first status frame.
#[derive(Message)]
#[rtype(result = "()")]
struct SocketOpened;

/// Result of one health probe.
#[derive(Message)]
#[rtype(result = "()")]
struct HealthProbed {
    comfy: Option<Result<(), String>>,
    langflow: Option<Result<(), String>>,
}

struct ComfyState {
    client: ComfyClient,
    /// Our client id on this node's ComfyUI; lifecycle events go only to it.
    client_id: String,
    events: broadcast::Sender<ComfyEvent>,
    socket_open: bool,
    /// Set while a connection attempt is under way.
    connecting: bool,
    reconnect_delay: Duration,
    last_probe: Result<(), String>,
}

struct LangflowState {
    client: LangflowClient,
    last_probe: Result<(), String>,
}

struct RunningTask {
    handle: SpawnHandle,
    remote_id: String,
    comfy: bool,
    updates: Recipient<TaskUpdate>,
}

/// A GPU box and its services.
pub struct GpuNode {
    config: NodeConfig,
    scheduler: Addr<Scheduler>,
    hub: Addr<ActivityHub>,
    files: ArtifactFiles,
    comfy: Option<ComfyState>,
    langflow: Option<LangflowState>,
    running: HashMap<TaskKey, RunningTask>,
    /// Availability last reported, to report changes only.
    reported: Option<(bool, Option<String>, u32)>,
}

impl GpuNode {
    pub fn new(
        config: NodeConfig,
        scheduler: Addr<Scheduler>,
        hub: Addr<ActivityHub>,
        files: ArtifactFiles,
    ) -> GpuNode {
        let comfy = config.comfyui.as_ref().map(|service| ComfyState {
            client: ComfyClient::new(service.url.clone()),
            client_id: uuid::Uuid::new_v4().simple().to_string(),
            events: broadcast::channel(EVENT_BUFFER).0,
            socket_open: false,
            connecting: false,
            reconnect_delay: RECONNECT_INITIAL,
            last_probe: Err("not probed yet".into()),
        });
        let langflow = config.langflow.as_ref().map(|service| LangflowState {
            client: LangflowClient::new(service.url.clone(), service.api_key.clone()),
            last_probe: Err("not probed yet".into()),
        });
        GpuNode {
            config,
            scheduler,
            hub,
            files,
            comfy,
            langflow,
            running: HashMap::new(),
            reported: None,
        }
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    /// Available when every configured service answers (and ComfyUI's socket is open).
    fn availability(&self) -> (bool, Option<String>) {
        if let Some(comfy) = &self.comfy {
            if let Err(reason) = &comfy.last_probe {
                return (false, Some(format!("comfyui: {reason}")));
            }
            if !comfy.socket_open {
                return (false, Some("comfyui: event socket not open".into()));
            }
        }
        if let Some(Err(reason)) = self.langflow.as_ref().map(|lf| &lf.last_probe) {
            return (false, Some(format!("langflow: {reason}")));
        }
        (true, None)
    }

    fn free_slots(&self) -> u32 {
        self.config
            .slot_count()
            .saturating_sub(self.running.len() as u32)
    }

    /// Tells the scheduler (and the activity stream) about availability or slot changes.
    fn report(&mut self) {
        let (available, reason) = self.availability();
        let free_slots = self.free_slots();
        let now = (available, reason.clone(), free_slots);
        if self.reported.as_ref() == Some(&now) {
            return;
        }
        let availability_changed = self.reported.as_ref().map(|(a, r, _)| (*a, r.clone()))
            != Some((available, reason.clone()));
        self.reported = Some(now);
        if availability_changed {
            self.hub.do_send(Publish(Activity::NodeState {
                node: self.name().to_string(),
                available,
                reason: reason.clone(),
            }));
        }
        self.scheduler.do_send(NodeStatus {
            node: self.name().to_string(),
            available,
            reason,
            free_slots,
        });
    }

    fn probe_health(&mut self, ctx: &mut Context<Self>) {
        let comfy = self.comfy.as_ref().map(|state| state.client.clone());
        let langflow = self.langflow.as_ref().map(|state| state.client.clone());
        let addr = ctx.address();
        actix::spawn(async move {
            let comfy = match comfy {
                Some(client) => Some(
                    client
                        .system_stats()
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                ),
                None => None,
            };
            let langflow = match langflow {
                Some(client) => Some(client.health().await.map_err(|e| e.to_string())),
                None => None,
            };
            addr.do_send(HealthProbed { comfy, langflow });
        });
    }

    /// Opens the ComfyUI event socket and forwards its events until it closes.
    fn open_socket(&mut self, ctx: &mut Context<Self>) {
        let Some(comfy) = self.comfy.as_mut() else {
            return;
        };
        if comfy.socket_open || comfy.connecting {
            return;
        }
        comfy.connecting = true;
        let url = comfy.client.base_url().clone();
        let client_id = comfy.client_id.clone();
        let sender = comfy.events.clone();
        let node = self.config.name.clone();
        let addr = ctx.address();
        let forward = async move {
            let mut stream = match comfyui::connect_events(&url, &client_id).await {
                Ok(stream) => stream,
                Err(err) => return Err(err.to_string()),
            };
            // connect_events returns once ComfyUI sent its first status frame: from here on,
            // prompts posted with our client id will have their events delivered.
            addr.do_send(SocketOpened);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(event) => {
                        let _ = sender.send(event);
                    }
                    Err(err) => {
                        warn!(node = %node, error = %err, "comfyui event socket failed");
                        break;
                    }
                }
            }
            Ok(())
        };
        ctx.spawn(
            forward
                .into_actor(self)
                .map(|result, act, ctx| act.socket_closed(result, ctx)),
        );
    }

    fn socket_closed(&mut self, result: Result<(), String>, ctx: &mut Context<Self>) {
        let Some(comfy) = self.comfy.as_mut() else {
            return;
        };
        comfy.socket_open = false;
        comfy.connecting = false;
        let delay = comfy.reconnect_delay;
        comfy.reconnect_delay = (delay * 2).min(RECONNECT_CAP);
        match result {
            Ok(()) => info!(node = %self.config.name, retry_in = ?delay, "comfyui socket closed"),
            Err(err) => {
                debug!(node = %self.config.name, error = %err, retry_in = ?delay,
                    "comfyui socket could not open");
                if let Some(comfy) = self.comfy.as_mut() {
                    comfy.last_probe = Err(err);
                }
            }
        }
        self.report();
        ctx.run_later(jittered(delay), |act, ctx| act.open_socket(ctx));
    }

    fn run_task(&mut self, task: Task, ctx: &mut Context<Self>) {
        let key = task.key.clone();
        let node = self.config.name.clone();
        let updates = task.updates.clone();
        let remote_id = task.remote_id.clone();
        let comfy = matches!(task.job, RemoteJob::Comfy(_));

        let work = match self.prepare(task) {
            Ok(work) => work,
            Err(error) => {
                let event = TaskEvent::Failed {
                    error,
                    retryable: false,
                };
                self.finish(key, node, updates, event);
                return;
            }
        };
        let finish_key = key.clone();
        let handle = ctx.spawn(work.into_actor(self).map(move |event, act, _ctx| {
            if let Some(task) = act.running.remove(&finish_key) {
                act.finish(finish_key, act.config.name.clone(), task.updates, event);
            }
        }));
        self.running.insert(
            key,
            RunningTask {
                handle,
                remote_id,
                comfy,
                updates,
            },
        );
        self.report();
    }

    /// Builds the future that runs a task on the right service.
    fn prepare(
        &self,
        task: Task,
    ) -> Result<std::pin::Pin<Box<dyn std::future::Future<Output = TaskEvent>>>, StepError> {
        let node = self.config.name.clone();
        let files = self.files.clone();
        match task.job.clone() {
            RemoteJob::Comfy(job) => {
                let comfy = self
                    .comfy
                    .as_ref()
                    .ok_or_else(|| no_service(&node, "comfyui"))?;
                let client = comfy.client.clone();
                let client_id = comfy.client_id.clone();
                let events = comfy.events.subscribe();
                Ok(Box::pin(async move {
                    if let Err(error) = confirm_placement(&task, &node).await {
                        return TaskEvent::Failed {
                            error,
                            retryable: true,
                        };
                    }
                    let updates = task.updates.clone();
                    let progress = |progress: JobProgress| {
                        let event = match progress {
                            JobProgress::Submitted { .. } => TaskEvent::Submitted,
                            JobProgress::Started => TaskEvent::Started,
                            JobProgress::Progress {
                                value,
                                max,
                                node: detail,
                            } => TaskEvent::Progress { value, max, detail },
                            JobProgress::Preview { mime, bytes, .. } => {
                                TaskEvent::Preview { mime, bytes }
                            }
                            JobProgress::Warning { message, .. } => TaskEvent::Notice(message),
                            _ => return,
                        };
                        updates.do_send(TaskUpdate {
                            key: task.key.clone(),
                            node: node.clone(),
                            event,
                        });
                    };
                    let outcome = comfyui::run_job(
                        &client,
                        &job,
                        &task.remote_id,
                        &client_id,
                        events,
                        &files,
                        progress,
                    )
                    .await;
                    match outcome {
                        Ok(artifacts) => TaskEvent::Succeeded { artifacts },
                        Err(err) => TaskEvent::Failed {
                            retryable: err.is_retryable(),
                            error: StepError {
                                message: err.to_string(),
                                details: err.details(),
                            },
                        },
                    }
                }))
            }
            RemoteJob::Langflow(job) => {
                let service = self.config.langflow.as_ref();
                let state = self.langflow.as_ref();
                let (Some(service), Some(state)) = (service, state) else {
                    return Err(no_service(&node, "langflow"));
                };
                let flow = service
                    .flows
                    .get(&job.flow)
                    .cloned()
                    .ok_or_else(|| StepError {
                        message: format!("node {node} has no LangFlow flow named {}", job.flow),
                        details: None,
                    })?;
                let client = state.client.clone();
                Ok(Box::pin(async move {
                    if let Err(error) = confirm_placement(&task, &node).await {
                        return TaskEvent::Failed {
                            error,
                            retryable: true,
                        };
                    }
                    task.updates.do_send(TaskUpdate {
                        key: task.key.clone(),
                        node: node.clone(),
                        event: TaskEvent::Started,
                    });
                    let outcome =
                        langflow::run_job(&client, &job, &flow, &task.remote_id, |_token| {}).await;
                    let text = match outcome {
                        Ok(text) => text,
                        Err(err) => {
                            return TaskEvent::Failed {
                                retryable: err.is_retryable(),
                                error: StepError {
                                    message: err.to_string(),
                                    details: None,
                                },
                            }
                        }
                    };
                    let stored = files
                        .put_bytes(
                            text.into_bytes().into(),
                            &format!("{}.txt", task.key.step_id),
                            ArtifactKind::Text,
                            "text/plain; charset=utf-8",
                        )
                        .await;
                    match stored {
                        Ok(meta) => TaskEvent::Succeeded {
                            artifacts: vec![meta],
                        },
                        Err(err) => TaskEvent::Failed {
                            error: StepError {
                                message: err.to_string(),
                                details: None,
                            },
                            retryable: true,
                        },
                    }
                }))
            }
        }
    }

    fn finish(
        &mut self,
        key: TaskKey,
        node: String,
        updates: Recipient<TaskUpdate>,
        event: TaskEvent,
    ) {
        let done = TaskUpdate {
            key: key.clone(),
            node: node.clone(),
            event: copy_final(&event),
        };
        self.scheduler.do_send(done);
        updates.do_send(TaskUpdate { key, node, event });
        self.report();
    }

    fn abort(&mut self, key: TaskKey, ctx: &mut Context<Self>) {
        let Some(task) = self.running.remove(&key) else {
            return;
        };
        ctx.cancel_future(task.handle);
        info!(node = %self.config.name, task = %key, "task aborted");
        if let (true, Some(comfy)) = (task.comfy, self.comfy.as_ref()) {
            let client = comfy.client.clone();
            let prompt_id = task.remote_id.clone();
            actix::spawn(async move {
                if let Err(err) = client.delete_queued(std::slice::from_ref(&prompt_id)).await {
                    debug!(prompt_id = %prompt_id, error = %err, "dequeue on abort failed");
                }
                if let Err(err) = client.interrupt(&prompt_id).await {
                    debug!(prompt_id = %prompt_id, error = %err, "interrupt on abort failed");
                }
            });
        }
        let node = self.config.name.clone();
        self.finish(key, node, task.updates, TaskEvent::Cancelled);
    }
}

fn no_service(node: &str, service: &str) -> StepError {
    StepError {
        message: format!("node {node} runs no {service}"),
        details: None,
    }
}

/// The scheduler only needs to know that a task ended; payloads stay with the run.
fn copy_final(event: &TaskEvent) -> TaskEvent {
    match event {
        TaskEvent::Succeeded { .. } => TaskEvent::Succeeded {
            artifacts: Vec::new(),
        },
        TaskEvent::Failed { error, retryable } => TaskEvent::Failed {
            error: error.clone(),
            retryable: *retryable,
        },
        _ => TaskEvent::Cancelled,
    }
}

async fn confirm_placement(task: &Task, node: &str) -> Result<(), StepError> {
    let confirm = crate::task::ConfirmPlacement {
        key: task.key.clone(),
        node: node.to_string(),
    };
    match task.placement.send(confirm).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => Err(StepError {
            message,
            details: None,
        }),
        Err(_) => Err(StepError {
            message: "the run stopped before the task started".into(),
            details: None,
        }),
    }
}

/// Spreads reconnects of many nodes apart: between 50% and 100% of the delay.
fn jittered(delay: Duration) -> Duration {
    let factor: f64 = rand::random_range(0.5..=1.0);
    delay.mul_f64(factor)
}

impl Actor for GpuNode {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        info!(node = %self.config.name, "node started");
        self.probe_health(ctx);
        self.open_socket(ctx);
        ctx.run_interval(HEALTH_INTERVAL, |act, ctx| act.probe_health(ctx));
    }
}

impl Supervised for GpuNode {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // Spawned futures (socket, tasks) were cancelled with the old context.
        warn!(node = %self.config.name, running = self.running.len(), "node actor restarting");
        if let Some(comfy) = self.comfy.as_mut() {
            comfy.socket_open = false;
            comfy.connecting = false;
            comfy.reconnect_delay = RECONNECT_INITIAL;
        }
        for (key, task) in self.running.drain() {
            task.updates.do_send(TaskUpdate {
                key,
                node: self.config.name.clone(),
                event: TaskEvent::Failed {
                    error: StepError {
                        message: "node actor restarted".into(),
                        details: None,
                    },
                    retryable: true,
                },
            });
        }
        self.reported = None;
    }
}

impl Handler<RunTask> for GpuNode {
    type Result = ();

    fn handle(&mut self, RunTask(task): RunTask, ctx: &mut Self::Context) {
        self.run_task(task, ctx);
    }
}

impl Handler<AbortTask> for GpuNode {
    type Result = ();

    fn handle(&mut self, AbortTask(key): AbortTask, ctx: &mut Self::Context) {
        self.abort(key, ctx);
    }
}

impl Handler<SocketOpened> for GpuNode {
    type Result = ();

    fn handle(&mut self, _msg: SocketOpened, _ctx: &mut Self::Context) {
        let Some(comfy) = self.comfy.as_mut() else {
            return;
        };
        info!(node = %self.config.name, "comfyui event socket open");
        comfy.socket_open = true;
        comfy.connecting = false;
        comfy.reconnect_delay = RECONNECT_INITIAL;
        self.report();
    }
}

impl Handler<HealthProbed> for GpuNode {
    type Result = ();

    fn handle(&mut self, msg: HealthProbed, ctx: &mut Self::Context) {
        if let (Some(state), Some(result)) = (self.comfy.as_mut(), msg.comfy) {
            state.last_probe = result;
        }
        if let (Some(state), Some(result)) = (self.langflow.as_mut(), msg.langflow) {
            state.last_probe = result;
        }
        self.open_socket(ctx);
        self.report();
    }
}
