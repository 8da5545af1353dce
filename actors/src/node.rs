//! The `GpuNode` actor: one per configured box, driving its ComfyUI and LangFlow services.
//!
//! It owns the node's service clients and, for ComfyUI, the one event socket every job on
//! the node listens to (ComfyUI sends a client's events only to that client's socket, so one
//! socket per node and client id serves all its prompts). It probes health on a timer, tells
//! the scheduler when it becomes available or unavailable (a task's end, copied to the
//! scheduler, frees its slot there), and runs the tasks the scheduler places on it, each as a
//! future spawned in its context ([`execute`]).
//!
//! A lost socket is reopened with jittered exponential backoff. A refused upgrade (an HTTP
//! status instead of a protocol switch) is tried a few times, then the node gives up and
//! stays unavailable with the reason: no reconnect storms against a proxy that says no.

mod execute;

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::activity::{Activity, ActivityHub, Publish};
use crate::comfyui::{self, ComfyClient, ComfyError, ComfyEvent};
use crate::config::NodeConfig;
use crate::langflow::LangflowClient;
use crate::scheduler::{NodeStatus, Scheduler};
use crate::store::ArtifactFiles;
use crate::task::{RemoteJob, Task, TaskEvent, TaskFailure, TaskKey, TaskUpdate};

use execute::{ComfyService, LangflowService, ServerIdCell, Services};

/// How often services are probed for health (a probe still under way is not doubled).
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a whole probe may take: each request has its own limit already, this bounds the
/// probe however its requests behave, so the node's verdict can never stay stale.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// First wait before reopening a lost ComfyUI socket; doubles up to the cap.
const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// Refused WebSocket upgrades in a row after which the node stops trying.
const MAX_REFUSED_UPGRADES: u32 = 5;
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

/// Cancel a prompt this node runs for no task of its own: work the daemon sent before it
/// restarted, for a run cancelled before the work was taken up again. Dequeued if pending,
/// interrupted if running, nothing if the server does not have it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelPrompt {
    pub prompt_id: String,
    pub server_id: Option<String>,
}

/// Start the actor over: its supervisor restarts it, which reopens the event socket from
/// scratch and resumes every running task by asking the service where it stands. For an
/// operator whose node is stuck in a way the daemon does not see. Answers the restart count
/// the node will have.
#[derive(Message)]
#[rtype(result = "u32")]
pub struct Restart;

/// The node's SSH tunnel came up or went down (sent by its [`crate::tunnel::Tunnel`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct TunnelLink {
    pub up: bool,
    /// Why it is down, when it is.
    pub reason: Option<String>,
}

/// The ComfyUI event socket is open and has delivered its first status frame.
#[derive(Message)]
#[rtype(result = "()")]
struct SocketOpened;

/// Result of one health probe.
struct HealthProbed {
    comfy: Option<Result<Option<u64>, String>>,
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
    /// Upgrades refused in a row.
    refused_upgrades: u32,
    /// Set once the node stopped trying to open its socket, with the reason.
    gave_up: Option<String>,
    last_probe: Result<(), String>,
    /// Free VRAM of the roomiest device, in MiB, from the last probe.
    vram_free_mb: Option<u64>,
}

struct LangflowState {
    client: LangflowClient,
    last_probe: Result<(), String>,
}

struct RunningTask {
    handle: SpawnHandle,
    task: Task,
    /// The id the server runs the task's prompt under, once the task knows it.
    server_id: ServerIdCell,
}

/// What the node last told the scheduler, to report changes only.
#[derive(PartialEq)]
struct Reported {
    available: bool,
    reason: Option<String>,
    vram_free_mb: Option<u64>,
    restarts: u32,
    reconnects: u32,
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
    /// Tasks that were running when the actor restarted; resumed once it has started again.
    to_resume: Vec<Task>,
    restarts: u32,
    /// Times the event socket opened after the first time.
    reconnects: u32,
    socket_ever_opened: bool,
    reported: Option<Reported>,
    /// When the node last stopped being available; `None` while it is.
    away_since: Option<std::time::Instant>,
    /// How long running tasks wait for the node to come back before they are given up here
    /// (and placed elsewhere by the scheduler).
    grace: Duration,
    /// For a node reached through a tunnel: why the tunnel is down, `None` while it is up.
    tunnel_down: Option<String>,
    /// Set while a health probe is under way: a server that is slow to answer gets one probe
    /// at a time, not one more every interval.
    probing: bool,
}

impl GpuNode {
    pub fn new(
        config: NodeConfig,
        scheduler: Addr<Scheduler>,
        hub: Addr<ActivityHub>,
        files: ArtifactFiles,
        grace: Duration,
    ) -> GpuNode {
        let comfy = config.comfyui.as_ref().map(|service| ComfyState {
            client: ComfyClient::new(service.url.clone()),
            client_id: uuid::Uuid::new_v4().simple().to_string(),
            events: broadcast::channel(EVENT_BUFFER).0,
            socket_open: false,
            connecting: false,
            reconnect_delay: RECONNECT_INITIAL,
            refused_upgrades: 0,
            gave_up: None,
            last_probe: Err("not probed yet".into()),
            vram_free_mb: None,
        });
        let langflow = config.langflow.as_ref().map(|service| LangflowState {
            client: LangflowClient::new(service.url.clone(), service.api_key.clone()),
            last_probe: Err("not probed yet".into()),
        });
        let tunnel_down = config.ssh.as_ref().map(|_| "tunnel connecting".to_string());
        GpuNode {
            config,
            scheduler,
            hub,
            files,
            comfy,
            langflow,
            running: HashMap::new(),
            to_resume: Vec::new(),
            restarts: 0,
            reconnects: 0,
            socket_ever_opened: false,
            reported: None,
            away_since: None,
            grace,
            tunnel_down,
            probing: false,
        }
    }

    /// Available when every configured service answers (and ComfyUI's socket is open).
    fn availability(&self) -> (bool, Option<String>) {
        if let Some(reason) = &self.tunnel_down {
            return (false, Some(reason.clone()));
        }
        if let Some(comfy) = &self.comfy {
            if let Some(reason) = &comfy.gave_up {
                return (false, Some(format!("comfyui: {reason}")));
            }
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

    /// Tells the scheduler (and the activity stream) about availability or VRAM changes.
    fn report(&mut self) {
        let (available, reason) = self.availability();
        match (available, self.away_since) {
            (true, _) => self.away_since = None,
            (false, None) => self.away_since = Some(std::time::Instant::now()),
            (false, Some(_)) => {}
        }
        let now = Reported {
            available,
            reason: reason.clone(),
            vram_free_mb: self.comfy.as_ref().and_then(|comfy| comfy.vram_free_mb),
            restarts: self.restarts,
            reconnects: self.reconnects,
        };
        if self.reported.as_ref() == Some(&now) {
            return;
        }
        let availability_changed = self
            .reported
            .as_ref()
            .is_none_or(|before| before.available != available || before.reason != reason);
        if availability_changed {
            self.hub.do_send(Publish(Activity::NodeState {
                node: self.config.name.clone(),
                available,
                reason: reason.clone(),
            }));
        }
        self.scheduler.do_send(NodeStatus {
            node: self.config.name.clone(),
            available,
            reason,
            vram_free_mb: now.vram_free_mb,
            restarts: now.restarts,
            reconnects: now.reconnects,
        });
        self.reported = Some(now);
    }

    /// Probes every service at once, unless a probe is still under way. A probe that runs out
    /// of time counts as failed for every service, with the reason.
    fn probe_health(&mut self, ctx: &mut Context<Self>) {
        if self.probing {
            debug!(node = %self.config.name, "health probe still under way; skipped");
            return;
        }
        self.probing = true;
        let comfy = self.comfy.as_ref().map(|state| state.client.clone());
        let langflow = self.langflow.as_ref().map(|state| state.client.clone());
        let comfy = async move {
            match comfy {
                Some(client) => Some(
                    client
                        .system_stats()
                        .await
                        .map(|stats| stats.devices.iter().map(|d| d.vram_free >> 20).max())
                        .map_err(|err| err.to_string()),
                ),
                None => None,
            }
        };
        let langflow = async move {
            match langflow {
                Some(client) => Some(client.health().await.map_err(|err| err.to_string())),
                None => None,
            }
        };
        let (has_comfy, has_langflow) = (self.comfy.is_some(), self.langflow.is_some());
        let probe = async move {
            match tokio::time::timeout(PROBE_TIMEOUT, futures_util::future::join(comfy, langflow))
                .await
            {
                Ok((comfy, langflow)) => HealthProbed { comfy, langflow },
                Err(_) => {
                    let reason = format!("health probe timed out after {PROBE_TIMEOUT:?}");
                    HealthProbed {
                        comfy: has_comfy.then(|| Err(reason.clone())),
                        langflow: has_langflow.then_some(Err(reason)),
                    }
                }
            }
        };
        ctx.spawn(probe.into_actor(self).map(|probed, act, ctx| {
            act.probing = false;
            act.health_probed(probed, ctx);
        }));
    }

    fn health_probed(&mut self, msg: HealthProbed, ctx: &mut Context<Self>) {
        if let (Some(state), Some(result)) = (self.comfy.as_mut(), msg.comfy) {
            match result {
                Ok(vram_free_mb) => {
                    state.last_probe = Ok(());
                    state.vram_free_mb = vram_free_mb.or(state.vram_free_mb);
                }
                Err(reason) => state.last_probe = Err(reason),
            }
        }
        if let (Some(state), Some(result)) = (self.langflow.as_mut(), msg.langflow) {
            state.last_probe = result;
        }
        self.open_socket(ctx);
        self.report();
        self.release_if_away_too_long(ctx);
    }

    /// Opens the ComfyUI event socket and forwards its events until it closes.
    fn open_socket(&mut self, ctx: &mut Context<Self>) {
        let Some(comfy) = self.comfy.as_mut() else {
            return;
        };
        if comfy.socket_open || comfy.connecting || comfy.gave_up.is_some() {
            return;
        }
        comfy.connecting = true;
        let url = comfy.client.base_url().clone();
        let client_id = comfy.client_id.clone();
        let sender = comfy.events.clone();
        let node = self.config.name.clone();
        let addr = ctx.address();
        let forward = async move {
            let mut stream = comfyui::connect_events(&url, &client_id).await?;
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
            Ok::<(), ComfyError>(())
        };
        ctx.spawn(
            forward
                .into_actor(self)
                .map(|result, act, ctx| act.socket_closed(result, ctx)),
        );
    }

    /// Schedules the next attempt with backoff, or gives up after repeated refusals.
    fn socket_closed(&mut self, result: Result<(), ComfyError>, ctx: &mut Context<Self>) {
        let node = self.config.name.clone();
        let Some(comfy) = self.comfy.as_mut() else {
            return;
        };
        comfy.socket_open = false;
        comfy.connecting = false;
        let delay = comfy.reconnect_delay;
        comfy.reconnect_delay = (delay * 2).min(RECONNECT_CAP);
        match result {
            Ok(()) => info!(node = %node, retry_in = ?delay, "comfyui socket closed"),
            Err(err @ ComfyError::UpgradeRefused { .. }) => {
                comfy.refused_upgrades += 1;
                warn!(node = %node, error = %err, attempt = comfy.refused_upgrades,
                    "comfyui refused the socket upgrade");
                if comfy.refused_upgrades >= MAX_REFUSED_UPGRADES {
                    let reason = format!(
                        "{err}; gave up after {} refused attempts (fix the server or proxy, \
                         then restart the daemon)",
                        comfy.refused_upgrades
                    );
                    warn!(node = %node, reason = %reason, "node unavailable");
                    comfy.gave_up = Some(reason);
                    self.report();
                    return;
                }
            }
            Err(err) => {
                debug!(node = %node, error = %err, retry_in = ?delay,
                    "comfyui socket could not open");
                comfy.last_probe = Err(err.to_string());
            }
        }
        self.report();
        ctx.run_later(jittered(delay), |act, ctx| act.open_socket(ctx));
    }

    fn socket_opened(&mut self) {
        let Some(comfy) = self.comfy.as_mut() else {
            return;
        };
        info!(node = %self.config.name, "comfyui event socket open");
        comfy.socket_open = true;
        comfy.connecting = false;
        comfy.reconnect_delay = RECONNECT_INITIAL;
        comfy.refused_upgrades = 0;
        if self.socket_ever_opened {
            self.reconnects += 1;
        }
        self.socket_ever_opened = true;
        self.report();
    }

    fn run_task(&mut self, task: Task, ctx: &mut Context<Self>) {
        let key = task.key.clone();
        let server_id = ServerIdCell::default();
        let services = match self.services_for(&task, &server_id) {
            Ok(services) => services,
            Err(failure) => {
                self.finish(&task, TaskEvent::Failed(failure));
                return;
            }
        };
        let work = execute::execute(task.clone(), services);
        let finished_key = key.clone();
        let handle = ctx.spawn(work.into_actor(self).map(move |event, act, _ctx| {
            if let Some(running) = act.running.remove(&finished_key) {
                act.finish(&running.task, event);
            }
        }));
        self.running.insert(
            key,
            RunningTask {
                handle,
                task,
                server_id,
            },
        );
    }

    /// The clients a task needs, or why this node cannot run it.
    fn services_for(&self, task: &Task, server_id: &ServerIdCell) -> Result<Services, TaskFailure> {
        let node = self.config.name.clone();
        let comfy = self.comfy.as_ref().map(|state| ComfyService {
            client: state.client.clone(),
            client_id: state.client_id.clone(),
            events: state.events.clone(),
            server_id: server_id.clone(),
        });
        let langflow = match &task.job {
            RemoteJob::Langflow(job) => {
                let service = self.config.langflow.as_ref();
                let state = self.langflow.as_ref();
                let (Some(service), Some(state)) = (service, state) else {
                    return Err(TaskFailure::permanent(format!(
                        "node {node} runs no langflow"
                    )));
                };
                let flow = service.flows.get(&job.flow).cloned().ok_or_else(|| {
                    let message = format!("node {node} has no LangFlow flow named {}", job.flow);
                    TaskFailure::permanent(message)
                })?;
                Some(LangflowService {
                    client: state.client.clone(),
                    flow,
                })
            }
            RemoteJob::Comfy(_) => None,
        };
        Ok(Services {
            node,
            files: self.files.clone(),
            comfy,
            langflow,
        })
    }

    /// Reports a task's end to its run and to the scheduler, which frees the slot.
    fn finish(&mut self, task: &Task, event: TaskEvent) {
        let node = self.config.name.clone();
        let done = TaskUpdate {
            key: task.key.clone(),
            node: node.clone(),
            event: summary(&event),
        };
        self.scheduler.do_send(done);
        task.updates.do_send(TaskUpdate {
            key: task.key.clone(),
            node,
            event,
        });
    }

    /// Gives up the running tasks of a node that has been away longer than the grace period:
    /// their runs retry them, checking here first should the node return, and the scheduler
    /// places them elsewhere once it has not.
    fn release_if_away_too_long(&mut self, ctx: &mut Context<Self>) {
        let away_too_long = self
            .away_since
            .is_some_and(|since| since.elapsed() > self.grace);
        if !away_too_long || self.running.is_empty() {
            return;
        }
        let keys: Vec<TaskKey> = self.running.keys().cloned().collect();
        for key in keys {
            let Some(running) = self.running.remove(&key) else {
                continue;
            };
            ctx.cancel_future(running.handle);
            warn!(node = %self.config.name, task = %key, "node away past the grace period");
            let message = format!(
                "node {} has been unavailable for more than {:?}",
                self.config.name, self.grace
            );
            self.finish(
                &running.task,
                TaskEvent::Failed(TaskFailure::node_lost(message)),
            );
        }
    }

    fn abort(&mut self, key: TaskKey, ctx: &mut Context<Self>) {
        let Some(running) = self.running.remove(&key) else {
            return;
        };
        ctx.cancel_future(running.handle);
        info!(node = %self.config.name, task = %key, "task aborted");
        if let (RemoteJob::Comfy(_), Some(comfy)) = (&running.task.job, self.comfy.as_ref()) {
            // By the id the server knows.
            let server_id = running.server_id.get().or(running.task.server_id.clone());
            let (client, node) = (comfy.client.clone(), self.config.name.clone());
            spawn_cancel(client, node, running.task.remote_id.clone(), server_id);
        }
        // A LangFlow call is aborted by dropping its future: the HTTP request goes with it.
        self.finish(&running.task, TaskEvent::Cancelled);
    }
}

/// Dequeues or interrupts a prompt in the background; `cancel` interrupts only what /queue
/// shows is ours, since older servers interrupt whatever runs.
fn spawn_cancel(client: ComfyClient, node: String, prompt_id: String, server_id: Option<String>) {
    actix::spawn(async move {
        match comfyui::cancel(&client, &prompt_id, server_id.as_deref()).await {
            Ok(done) => info!(node = %node, prompt_id = %prompt_id,
                dequeued = ?done.dequeued, interrupted = ?done.interrupted, "prompt cancelled"),
            Err(err) => warn!(node = %node, prompt_id = %prompt_id, error = %err,
                "cancelling the prompt failed"),
        }
    });
}

/// The scheduler only needs to know that a task ended; payloads stay with the run.
fn summary(event: &TaskEvent) -> TaskEvent {
    match event {
        TaskEvent::Succeeded { .. } => TaskEvent::Succeeded {
            artifacts: Vec::new(),
        },
        TaskEvent::Failed(failure) => TaskEvent::Failed(failure.clone()),
        _ => TaskEvent::Cancelled,
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
        info!(node = %self.config.name, restarts = self.restarts, "node started");
        self.probe_health(ctx);
        self.open_socket(ctx);
        ctx.run_interval(HEALTH_INTERVAL, |act, ctx| act.probe_health(ctx));
        for task in std::mem::take(&mut self.to_resume) {
            self.run_task(task, ctx);
        }
    }
}

impl Supervised for GpuNode {
    /// The old context's futures (socket, tasks) are gone: reopen the socket from scratch and
    /// resume every task that was running, asking the service where each stands rather than
    /// sending it again.
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts += 1;
        warn!(node = %self.config.name, running = self.running.len(), restarts = self.restarts,
            "node actor restarting");
        // The probe under way went with the old context.
        self.probing = false;
        if let Some(comfy) = self.comfy.as_mut() {
            comfy.socket_open = false;
            comfy.connecting = false;
            comfy.reconnect_delay = RECONNECT_INITIAL;
            comfy.refused_upgrades = 0;
        }
        self.to_resume = self
            .running
            .drain()
            .map(|(_, running)| Task {
                resume: true,
                // The id the server runs the prompt under, if the task had learned it.
                server_id: running.server_id.get().or(running.task.server_id.clone()),
                ..running.task
            })
            .collect();
        self.reported = None;
    }
}

impl Handler<RunTask> for GpuNode {
    type Result = ();

    fn handle(&mut self, RunTask(task): RunTask, ctx: &mut Self::Context) {
        self.run_task(task, ctx);
    }
}

impl Handler<Restart> for GpuNode {
    type Result = u32;

    fn handle(&mut self, _msg: Restart, ctx: &mut Self::Context) -> u32 {
        info!(node = %self.config.name, running = self.running.len(), "node restart asked");
        ctx.stop();
        self.restarts + 1
    }
}

impl Handler<CancelPrompt> for GpuNode {
    type Result = ();

    fn handle(&mut self, msg: CancelPrompt, _ctx: &mut Self::Context) {
        if let Some(comfy) = self.comfy.as_ref() {
            let client = comfy.client.clone();
            spawn_cancel(
                client,
                self.config.name.clone(),
                msg.prompt_id,
                msg.server_id,
            );
        }
    }
}

impl Handler<AbortTask> for GpuNode {
    type Result = ();

    fn handle(&mut self, AbortTask(key): AbortTask, ctx: &mut Self::Context) {
        self.abort(key, ctx);
    }
}

impl Handler<TunnelLink> for GpuNode {
    type Result = ();

    /// Down: unavailable at once (running tasks wait within the grace period, as for any
    /// absence). Up: probe and reopen the event socket now rather than at the next tick.
    fn handle(&mut self, TunnelLink { up, reason }: TunnelLink, ctx: &mut Self::Context) {
        self.tunnel_down = if up {
            None
        } else {
            Some(reason.unwrap_or_else(|| "tunnel down".into()))
        };
        if up {
            if let Some(comfy) = self.comfy.as_mut() {
                comfy.reconnect_delay = RECONNECT_INITIAL;
            }
            self.probe_health(ctx);
            self.open_socket(ctx);
        }
        self.report();
    }
}

impl Handler<SocketOpened> for GpuNode {
    type Result = ();

    fn handle(&mut self, _msg: SocketOpened, _ctx: &mut Self::Context) {
        self.socket_opened();
    }
}
