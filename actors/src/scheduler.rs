//! The `Scheduler` actor: places every ready task on the best node.
//!
//! Runs send [`Enqueue`]; nodes report their availability and free VRAM with [`NodeStatus`].
//! Slots are counted here, not by the nodes: a node's free slots are its slot count minus the
//! tasks placed on it whose final [`TaskUpdate`] has not come back. A count reported by the
//! node would lag the `RunTask`s still in its mailbox, and trusting it would place more tasks
//! than the node has slots. A task goes to a node that is available, has a free slot and can
//! run it
//! (service, capability, models, VRAM); among those, one that recently ran the task's models
//! wins (a cold Flux or Wan load costs tens of seconds), then the one with the most free
//! slots. Tasks nobody can take now wait in arrival order.
//!
//! Two kinds of task carry constraints. A task resumed after a restart (or retried after its
//! node was lost) is pinned to the node its work was sent to, until that node has been away
//! for the grace period; then any capable node may take it, the one it left included. That
//! node is not excluded: when it is the only one that can run the step, excluding it would
//! leave the task waiting forever once it is back. Placed back there, the task is resumed
//! (the node asks its service where the work stands before sending anything), since the
//! service may still hold it; placed elsewhere, it is sent as new work. A retry after
//! out-of-memory avoids the node that failed and wants one with more free VRAM; a task no
//! node could ever take fails at once rather than waiting forever.
//!
//! Leases ([`crate::lease`]) add one more filter, asked of the shared [`LeaseBook`] when a
//! task is placed: a leased node takes only its lease's tasks, and a task under a lease goes
//! only to its lease's nodes. Expired leases are swept on the grace timer, and
//! [`LeasesChanged`] places what waited for a released node.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;
use tracing::{debug, info};

use crate::config::NodeConfig;
use crate::lease::LeaseBook;
use crate::node::{AbortTask, CancelPrompt, GpuNode, RunTask};
use crate::task::{RemoteJob, Task, TaskEvent, TaskFailure, TaskKey, TaskUpdate};

/// How many recently used model files the scheduler remembers per node.
const REMEMBERED_MODELS: usize = 8;
/// How often waiting tasks are checked against the grace period.
const GRACE_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// A node joins the scheduler's view (sent once per node at startup).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterNode {
    pub config: NodeConfig,
    pub addr: Addr<GpuNode>,
}

/// A node's availability, free VRAM or counters changed. It carries no slot count: the
/// scheduler counts slots itself (see the module doc).
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeStatus {
    pub node: String,
    pub available: bool,
    pub reason: Option<String>,
    /// Free VRAM of the node's GPU, in MiB, when the service reports it.
    pub vram_free_mb: Option<u64>,
    /// Times the node's actor was restarted by its supervisor.
    pub restarts: u32,
    /// Times the node's event socket was opened again after being lost.
    pub reconnects: u32,
}

/// Queue a task for placement.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Enqueue(pub Task);

/// Drop a run's queued tasks and abort its placed ones.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelRun {
    pub run_id: String,
    /// Prompts the run's record places on a node: each is cancelled there unless a task
    /// running on that node carries it (that task's abort cancels it). After a daemon
    /// restart such a prompt may run on its node while its task still waits in the queue.
    pub prompts: Vec<PlacedPrompt>,
}

/// A ComfyUI prompt a run's record places on a node.
#[derive(Debug, Clone)]
pub struct PlacedPrompt {
    pub node: String,
    pub step_id: String,
    pub prompt_id: String,
    pub server_id: Option<String>,
}

/// Leases were released: tasks waiting for those nodes may be placed now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeasesChanged;

/// The scheduler's view of every node.
#[derive(Message)]
#[rtype(result = "Vec<NodeView>")]
pub struct ListNodes;

/// One node as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub name: String,
    pub os: Option<String>,
    pub available: bool,
    pub reason: Option<String>,
    pub slots: u32,
    pub free_slots: u32,
    pub running: Vec<String>,
    pub services: Vec<&'static str>,
    pub capabilities: Vec<String>,
    pub gpus: Vec<String>,
    pub vram_mb: u64,
    pub vram_free_mb: Option<u64>,
    pub recent_models: Vec<String>,
    pub restarts: u32,
    pub reconnects: u32,
}

struct NodeEntry {
    config: NodeConfig,
    addr: Addr<GpuNode>,
    available: bool,
    reason: Option<String>,
    /// Tasks placed here whose final update has not come back: what occupies its slots.
    running: Vec<TaskKey>,
    /// Most recent first.
    recent_models: VecDeque<String>,
    vram_free_mb: Option<u64>,
    restarts: u32,
    reconnects: u32,
    /// When the node last stopped being available; `None` while it is.
    away_since: Option<Instant>,
    /// Prompts of tasks taken off this node while it was away and placed elsewhere: it may
    /// still hold them, and cancels them once it is back.
    strays: Vec<CancelPrompt>,
}

impl NodeEntry {
    fn view(&self) -> NodeView {
        let mut services = Vec::new();
        let mut capabilities = Vec::new();
        if let Some(comfy) = &self.config.comfyui {
            services.push("comfyui");
            capabilities.extend(comfy.capabilities.iter().cloned());
        }
        if let Some(langflow) = &self.config.langflow {
            services.push("langflow");
            capabilities.extend(langflow.flows.keys().cloned());
        }
        NodeView {
            name: self.config.name.clone(),
            os: self.config.os.clone(),
            available: self.available,
            reason: self.reason.clone(),
            slots: self.config.slot_count(),
            free_slots: self.free_slots(),
            running: self.running.iter().map(ToString::to_string).collect(),
            services,
            capabilities,
            gpus: self
                .config
                .gpus
                .iter()
                .map(|gpu| gpu.model.clone())
                .collect(),
            vram_mb: self.config.total_vram_mb(),
            vram_free_mb: self.vram_free_mb,
            recent_models: self.recent_models.iter().cloned().collect(),
            restarts: self.restarts,
            reconnects: self.reconnects,
        }
    }

    /// Slots not taken by a task placed here, whether or not the node has started it yet.
    fn free_slots(&self) -> u32 {
        self.config
            .slot_count()
            .saturating_sub(self.running.len() as u32)
    }

    fn warm_models(&self, task: &Task) -> usize {
        task.requirement
            .models
            .iter()
            .filter(|m| self.recent_models.contains(m))
            .count()
    }
}

/// A task waiting for a node, and since when.
struct Waiting {
    task: Task,
    since: Instant,
}

/// The ready queue and the live view of node capacity.
pub struct Scheduler {
    nodes: Vec<NodeEntry>,
    queue: VecDeque<Waiting>,
    /// How long a node may be away before work pinned to it is placed elsewhere.
    node_grace: Duration,
    /// Nodes reserved for one client; shared with the cluster handle that grants them.
    leases: LeaseBook,
}

impl Scheduler {
    pub fn new(node_grace: Duration) -> Scheduler {
        Scheduler::with_leases(node_grace, LeaseBook::default())
    }

    /// A scheduler that honours the leases of `leases`.
    pub fn with_leases(node_grace: Duration, leases: LeaseBook) -> Scheduler {
        Scheduler {
            nodes: Vec::new(),
            queue: VecDeque::new(),
            node_grace,
            leases,
        }
    }

    /// The lease hook: whether leases let this task onto this node now.
    fn lease_admits(&self, task: &Task, node: &NodeEntry) -> bool {
        self.leases.admits(task.lease.as_deref(), &node.config.name)
    }

    /// Places as many queued tasks as free slots allow, in arrival order; a task no node can
    /// take now does not hold back the ones behind it.
    fn dispatch(&mut self) {
        let mut still_waiting = VecDeque::new();
        while let Some(waiting) = self.queue.pop_front() {
            match self.pick_node(&waiting.task) {
                Some(index) => self.place(index, waiting.task),
                None => still_waiting.push_back(waiting),
            }
        }
        self.queue = still_waiting;
    }

    /// The best node that can take the task now.
    fn pick_node(&self, task: &Task) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.available && node.free_slots() > 0)
            .filter(|(_, node)| self.allowed(task, node))
            .filter(|(_, node)| self.lease_admits(task, node))
            .filter(|(_, node)| self.has_more_vram(task, node))
            .max_by_key(|(index, node)| {
                (
                    // The node the work was taken off may have it done or under way.
                    task.left_node.as_ref() == Some(&node.config.name),
                    node.warm_models(task),
                    node.free_slots(),
                    std::cmp::Reverse(*index),
                )
            })
            .map(|(index, _)| index)
    }

    /// Whether the node may ever take the task: it can run it and the task does not exclude
    /// it.
    fn allowed(&self, task: &Task, node: &NodeEntry) -> bool {
        let name = &node.config.name;
        let pinned_elsewhere = task.pinned_node.as_ref().is_some_and(|pin| pin != name);
        !pinned_elsewhere
            && !task.avoid_nodes.contains(name)
            && task.requirement.satisfied_by(&node.config)
    }

    /// For a retry after out-of-memory: more free VRAM than the node that failed had. Unknown
    /// figures do not exclude a node.
    fn has_more_vram(&self, task: &Task, node: &NodeEntry) -> bool {
        let Some(failed) = &task.more_vram_than else {
            return true;
        };
        let failed_free = self.node(failed).and_then(|entry| entry.vram_free_mb);
        match (node.vram_free_mb, failed_free) {
            (Some(free), Some(failed_free)) => free > failed_free,
            _ => true,
        }
    }

    /// Lets go of pins to nodes away longer than the grace period, and fails tasks that
    /// waited that long for a node with more VRAM that never came. The node a pin is let go
    /// of stays allowed (see the module doc): the task takes whichever capable node is
    /// available first.
    fn apply_grace(&mut self) {
        let grace = self.node_grace;
        let mut changed = false;
        let mut kept = VecDeque::new();
        while let Some(mut waiting) = self.queue.pop_front() {
            if let Some(pin) = waiting.task.pinned_node.clone() {
                let away_too_long = match self.node(&pin) {
                    Some(node) => node.away_since.is_some_and(|since| since.elapsed() > grace),
                    None => true,
                };
                if away_too_long {
                    info!(task = %waiting.task.key, node = %pin,
                        "node away past the grace period; the task may go to any capable node");
                    waiting.task.pinned_node = None;
                    waiting.task.resume = false;
                    waiting.task.left_node = Some(pin);
                    changed = true;
                }
            }
            if waiting.task.more_vram_than.is_some() && waiting.since.elapsed() > grace {
                let failed = waiting.task.more_vram_than.clone().unwrap_or_default();
                let message = format!(
                    "out of memory on {failed}, and no node with more free VRAM became available"
                );
                reply_failed(&waiting.task, TaskFailure::permanent(message));
                continue;
            }
            kept.push_back(waiting);
        }
        self.queue = kept;
        if changed {
            self.dispatch();
        }
    }

    fn node(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|node| node.config.name == name)
    }

    fn place(&mut self, index: usize, mut task: Task) {
        let node = &mut self.nodes[index];
        // Back on the node it was taken off: the work may be queued, running or done there,
        // or forgotten by a restarted service; only asking the service tells which, so the
        // work is neither done twice nor lost.
        if task.left_node.as_ref() == Some(&node.config.name) {
            task.resume = true;
        }
        let placed_elsewhere = task
            .left_node
            .clone()
            .filter(|left| *left != node.config.name);
        if let (Some(left), RemoteJob::Comfy(_)) = (placed_elsewhere, &task.job) {
            let stray = CancelPrompt {
                prompt_id: task.remote_id.clone(),
                server_id: task.server_id.clone(),
            };
            if let Some(left) = self.node_mut(&left) {
                left.strays.push(stray);
            }
        }
        let node = &mut self.nodes[index];
        info!(task = %task.key, node = %node.config.name, resume = task.resume, "task placed");
        node.running.push(task.key.clone());
        for model in &task.requirement.models {
            node.recent_models.retain(|m| m != model);
            node.recent_models.push_front(model.clone());
        }
        node.recent_models.truncate(REMEMBERED_MODELS);
        node.addr.do_send(RunTask(task));
    }

    fn node_mut(&mut self, name: &str) -> Option<&mut NodeEntry> {
        self.nodes.iter_mut().find(|node| node.config.name == name)
    }
}

/// Tells a task's run that it failed before reaching a node.
fn reply_failed(task: &Task, failure: TaskFailure) {
    task.updates.do_send(TaskUpdate {
        key: task.key.clone(),
        node: String::new(),
        event: TaskEvent::Failed(failure),
    });
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(GRACE_CHECK_INTERVAL, |act, _ctx| {
            act.apply_grace();
            if act.leases.expire_due() {
                act.dispatch();
            }
        });
    }
}

impl Supervised for Scheduler {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // The queue and node view stay valid across a restart: nodes keep reporting.
        info!(queued = self.queue.len(), "scheduler restarting");
    }
}

impl Handler<RegisterNode> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: RegisterNode, _ctx: &mut Self::Context) {
        self.nodes
            .retain(|node| node.config.name != msg.config.name);
        self.nodes.push(NodeEntry {
            available: false,
            reason: Some("starting".into()),
            running: Vec::new(),
            recent_models: VecDeque::new(),
            vram_free_mb: None,
            restarts: 0,
            reconnects: 0,
            away_since: Some(Instant::now()),
            strays: Vec::new(),
            addr: msg.addr,
            config: msg.config,
        });
    }
}

impl Handler<NodeStatus> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: NodeStatus, _ctx: &mut Self::Context) {
        let Some(node) = self.node_mut(&msg.node) else {
            return;
        };
        if node.available != msg.available {
            info!(node = %msg.node, available = msg.available, reason = ?msg.reason,
                "node availability changed");
        }
        if msg.available {
            node.away_since = None;
            for stray in std::mem::take(&mut node.strays) {
                info!(node = %msg.node, prompt_id = %stray.prompt_id,
                    "node back: cancelling a prompt its task ran elsewhere");
                node.addr.do_send(stray);
            }
        } else if node.away_since.is_none() {
            node.away_since = Some(Instant::now());
        }
        node.available = msg.available;
        node.reason = msg.reason;
        node.vram_free_mb = msg.vram_free_mb.or(node.vram_free_mb);
        node.restarts = msg.restarts;
        node.reconnects = msg.reconnects;
        self.dispatch();
    }
}

impl Handler<Enqueue> for Scheduler {
    type Result = ();

    fn handle(&mut self, Enqueue(task): Enqueue, _ctx: &mut Self::Context) {
        debug!(task = %task.key, capability = %task.requirement.capability, "task queued");
        // A leased task must fit one of its lease's nodes; an unleased one may wait for a
        // leased node to be freed.
        let possible = self.nodes.iter().any(|node| {
            self.allowed(&task, node) && (task.lease.is_none() || self.lease_admits(&task, node))
        });
        if !possible && task.pinned_node.is_none() {
            let message = if task.avoid_nodes.is_empty() {
                "no configured node can run this step".to_string()
            } else {
                format!(
                    "no node other than {} can run this step",
                    task.avoid_nodes.join(", ")
                )
            };
            reply_failed(&task, TaskFailure::permanent(message));
            return;
        }
        self.queue.push_back(Waiting {
            task,
            since: Instant::now(),
        });
        self.dispatch();
    }
}

impl Handler<TaskUpdate> for Scheduler {
    type Result = ();

    /// Nodes copy a task's final update here so the scheduler forgets it: that frees its
    /// slot, so waiting tasks may be placed.
    fn handle(&mut self, msg: TaskUpdate, _ctx: &mut Self::Context) {
        let finished = matches!(
            msg.event,
            TaskEvent::Succeeded { .. } | TaskEvent::Failed(_) | TaskEvent::Cancelled
        );
        if let (true, Some(node)) = (finished, self.node_mut(&msg.node)) {
            node.running.retain(|key| key != &msg.key);
            self.dispatch();
        }
    }
}

impl Handler<CancelRun> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: CancelRun, _ctx: &mut Self::Context) {
        let (cancelled, kept): (VecDeque<Waiting>, VecDeque<Waiting>) = self
            .queue
            .drain(..)
            .partition(|waiting| waiting.task.key.run_id == msg.run_id);
        self.queue = kept;
        for Waiting { task, .. } in cancelled {
            task.updates.do_send(TaskUpdate {
                key: task.key.clone(),
                node: String::new(),
                event: TaskEvent::Cancelled,
            });
        }
        for node in &self.nodes {
            for key in node.running.iter().filter(|key| key.run_id == msg.run_id) {
                node.addr.do_send(AbortTask(key.clone()));
            }
        }
        for prompt in msg.prompts {
            let Some(node) = self
                .nodes
                .iter()
                .find(|node| node.config.name == prompt.node)
            else {
                continue;
            };
            let aborted = node
                .running
                .iter()
                .any(|key| key.run_id == msg.run_id && key.step_id == prompt.step_id);
            if !aborted {
                node.addr.do_send(CancelPrompt {
                    prompt_id: prompt.prompt_id,
                    server_id: prompt.server_id,
                });
            }
        }
    }
}

impl Handler<LeasesChanged> for Scheduler {
    type Result = ();

    fn handle(&mut self, _msg: LeasesChanged, _ctx: &mut Self::Context) {
        self.dispatch();
    }
}

impl Handler<ListNodes> for Scheduler {
    type Result = MessageResult<ListNodes>;

    fn handle(&mut self, _msg: ListNodes, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.nodes.iter().map(NodeEntry::view).collect())
    }
}
