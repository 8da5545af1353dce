//! The `Scheduler` actor: places every ready task on the best node.
//!
//! Runs send [`Enqueue`]; nodes report their availability and free slots with
//! [`NodeStatus`]. A task goes to a node that is available, has a free slot and can run it
//! (service, capability, models, VRAM); among those, one that recently ran the task's models
//! wins (a cold Flux or Wan load costs tens of seconds), then the one with the most free
//! slots. Tasks nobody can take now wait in arrival order.

use std::collections::VecDeque;

use actix::prelude::*;
use serde::Serialize;
use tracing::{debug, info};

use crate::config::NodeConfig;
use crate::node::{AbortTask, GpuNode, RunTask};
use crate::task::{Task, TaskEvent, TaskKey, TaskUpdate};

/// How many recently used model files the scheduler remembers per node.
const REMEMBERED_MODELS: usize = 8;

/// A node joins the scheduler's view (sent once per node at startup).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterNode {
    pub config: NodeConfig,
    pub addr: Addr<GpuNode>,
}

/// A node's availability changed, or one of its slots was freed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeStatus {
    pub node: String,
    pub available: bool,
    pub reason: Option<String>,
    pub free_slots: u32,
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
}

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
    pub recent_models: Vec<String>,
}

struct NodeEntry {
    config: NodeConfig,
    addr: Addr<GpuNode>,
    available: bool,
    reason: Option<String>,
    free_slots: u32,
    /// Tasks placed here and not yet finished.
    running: Vec<TaskKey>,
    /// Most recent first.
    recent_models: VecDeque<String>,
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
            free_slots: self.free_slots,
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
            recent_models: self.recent_models.iter().cloned().collect(),
        }
    }

    fn warm_models(&self, task: &Task) -> usize {
        task.requirement
            .models
            .iter()
            .filter(|m| self.recent_models.contains(m))
            .count()
    }
}

/// The ready queue and the live view of node capacity.
#[derive(Default)]
pub struct Scheduler {
    nodes: Vec<NodeEntry>,
    queue: VecDeque<Task>,
}

impl Scheduler {
    /// Places as many queued tasks as free slots allow, in arrival order; a task no node can
    /// take now does not hold back the ones behind it.
    fn dispatch(&mut self) {
        let mut waiting = VecDeque::new();
        while let Some(task) = self.queue.pop_front() {
            match self.pick_node(&task) {
                Some(index) => self.place(index, task),
                None => waiting.push_back(task),
            }
        }
        self.queue = waiting;
    }

    fn pick_node(&self, task: &Task) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.available && node.free_slots > 0)
            .filter(|(_, node)| task.requirement.satisfied_by(&node.config))
            .max_by_key(|(index, node)| {
                (
                    node.warm_models(task),
                    node.free_slots,
                    std::cmp::Reverse(*index),
                )
            })
            .map(|(index, _)| index)
    }

    fn place(&mut self, index: usize, task: Task) {
        let node = &mut self.nodes[index];
        info!(task = %task.key, node = %node.config.name, "task placed");
        node.free_slots -= 1;
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

impl Actor for Scheduler {
    type Context = Context<Self>;
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
            free_slots: 0,
            running: Vec::new(),
            recent_models: VecDeque::new(),
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
        node.available = msg.available;
        node.reason = msg.reason;
        node.free_slots = msg.free_slots;
        self.dispatch();
    }
}

impl Handler<Enqueue> for Scheduler {
    type Result = ();

    fn handle(&mut self, Enqueue(task): Enqueue, _ctx: &mut Self::Context) {
        debug!(task = %task.key, capability = %task.requirement.capability, "task queued");
        self.queue.push_back(task);
        self.dispatch();
    }
}

impl Handler<TaskUpdate> for Scheduler {
    type Result = ();

    /// Nodes copy a task's final update here so the scheduler forgets it.
    fn handle(&mut self, msg: TaskUpdate, _ctx: &mut Self::Context) {
        let finished = matches!(
            msg.event,
            TaskEvent::Succeeded { .. } | TaskEvent::Failed { .. } | TaskEvent::Cancelled
        );
        if let (true, Some(node)) = (finished, self.node_mut(&msg.node)) {
            node.running.retain(|key| key != &msg.key);
        }
    }
}

impl Handler<CancelRun> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: CancelRun, _ctx: &mut Self::Context) {
        let (cancelled, kept): (VecDeque<Task>, VecDeque<Task>) = self
            .queue
            .drain(..)
            .partition(|task| task.key.run_id == msg.run_id);
        self.queue = kept;
        for task in cancelled {
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
    }
}

impl Handler<ListNodes> for Scheduler {
    type Result = MessageResult<ListNodes>;

    fn handle(&mut self, _msg: ListNodes, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.nodes.iter().map(NodeEntry::view).collect())
    }
}
