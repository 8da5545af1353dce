//! The scheduler's slot accounting against a real node actor and the ComfyUI simulator.
//!
//! Guards against a node taking more tasks than it has slots: a status report from the node
//! (sent on every availability or VRAM change) could arrive after a task was placed but
//! before the node had taken it from its mailbox, and used to reset the node's free slots to
//! the node's own, stale count.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix::prelude::*;
use multiplex_actors::activity::ActivityHub;
use multiplex_actors::artifact::ArtifactKind;
use multiplex_actors::comfyui::ComfyClient;
use multiplex_actors::config::{ComfyServiceConfig, NodeConfig};
use multiplex_actors::node::GpuNode;
use multiplex_actors::scheduler::{Enqueue, ListNodes, NodeStatus, RegisterNode, Scheduler};
use multiplex_actors::store::Store;
use multiplex_actors::task::{
    ConfirmPlacement, RecordServerId, RemoteJob, Task, TaskEvent, TaskKey, TaskUpdate,
};
use multiplex_actors::workflow::{ComfyJob, Requirement, Service};
use multiplex_sim::comfyui::{ComfySim, ComfySimConfig};
use serde_json::json;

/// Longest the test waits for anything; a bound, never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(60);

/// Plays the runs' part: confirms every placement, remembers which tasks succeeded.
#[derive(Default)]
struct Runs {
    succeeded: HashSet<String>,
    failed: Vec<String>,
}

impl Actor for Runs {
    type Context = Context<Self>;
}

impl Handler<ConfirmPlacement> for Runs {
    type Result = Result<(), String>;

    fn handle(&mut self, _msg: ConfirmPlacement, _ctx: &mut Self::Context) -> Self::Result {
        Ok(())
    }
}

impl Handler<RecordServerId> for Runs {
    type Result = Result<(), String>;

    fn handle(&mut self, _msg: RecordServerId, _ctx: &mut Self::Context) -> Self::Result {
        Ok(())
    }
}

impl Handler<TaskUpdate> for Runs {
    type Result = ();

    fn handle(&mut self, msg: TaskUpdate, _ctx: &mut Self::Context) {
        match msg.event {
            TaskEvent::Succeeded { .. } => {
                self.succeeded.insert(msg.key.step_id);
            }
            TaskEvent::Failed(failure) => self.failed.push(failure.error.message),
            _ => {}
        }
    }
}

#[derive(Message)]
#[rtype(result = "(usize, Vec<String>)")]
struct Outcome;

impl Handler<Outcome> for Runs {
    type Result = MessageResult<Outcome>;

    fn handle(&mut self, _msg: Outcome, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult((self.succeeded.len(), self.failed.clone()))
    }
}

fn task(index: usize, runs: &Addr<Runs>) -> Task {
    let prompt = json!({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": index}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "s"}}
    });
    Task {
        key: TaskKey {
            run_id: "flood".into(),
            step_id: format!("step-{index}"),
            attempt: 1,
        },
        requirement: Requirement {
            service: Service::ComfyUi,
            capability: "comfyui".into(),
            models: Vec::new(),
            vram_mb: 0,
        },
        job: RemoteJob::Comfy(ComfyJob {
            prompt,
            uploads: Vec::new(),
            output_kind: ArtifactKind::Image,
        }),
        remote_id: uuid::Uuid::new_v4().to_string(),
        updates: runs.clone().recipient(),
        server_id: None,
        placement: runs.clone().recipient(),
        server_ids: runs.clone().recipient(),
        resume: false,
        pinned_node: None,
        left_node: None,
        avoid_nodes: Vec::new(),
        more_vram_than: None,
        lease: None,
    }
}

/// A one-slot node is flooded with tasks while status reports (as the node sends on every
/// VRAM change) keep arriving: the scheduler never has two tasks on it, ComfyUI never holds
/// two of its prompts at once, and every task still runs.
#[actix_rt::test]
async fn a_one_slot_node_never_runs_two_tasks_while_it_reports_status() {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
    let config = ComfySimConfig {
        step_ms: 20,
        model_load_ms: 1,
        ..ComfySimConfig::default()
    };
    let sim = ComfySim::start(config, addr)
        .await
        .expect("simulator starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store opens");
    let node_config = NodeConfig {
        name: "solo".into(),
        host: None,
        os: None,
        gpus: Vec::new(),
        slots: Some(1),
        comfyui: Some(ComfyServiceConfig {
            url: sim.url(),
            capabilities: vec!["image".into()],
            models: Vec::new(),
            forward: None,
        }),
        langflow: None,
        ssh: None,
    };
    let grace = Duration::from_secs(30);
    let hub = ActivityHub::default().start();
    let scheduler = Scheduler::new(grace).start();
    let node = GpuNode::new(
        node_config.clone(),
        scheduler.clone(),
        hub,
        store.artifacts().clone(),
        grace,
    )
    .start();
    scheduler
        .send(RegisterNode {
            config: node_config,
            addr: node,
        })
        .await
        .expect("the scheduler answers");
    let deadline = Instant::now() + PATIENCE;
    while !scheduler.send(ListNodes).await.expect("answers")[0].available {
        assert!(Instant::now() < deadline, "the node never became available");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let runs = Runs::default().start();
    const TASKS: usize = 8;
    for index in 0..TASKS {
        scheduler.do_send(Enqueue(task(index, &runs)));
    }
    let comfy = ComfyClient::new(sim.url());
    let mut vram = 20_000;
    loop {
        // What the node reports whenever its free VRAM moves; interleaved with placements.
        for _ in 0..20 {
            vram += 1;
            scheduler.do_send(NodeStatus {
                node: "solo".into(),
                available: true,
                reason: None,
                vram_free_mb: Some(vram),
                restarts: 0,
                reconnects: 0,
            });
        }
        let view = scheduler.send(ListNodes).await.expect("answers").remove(0);
        assert!(
            view.running.len() <= 1,
            "two tasks on a one-slot node: {:?}",
            view.running
        );
        let queue = comfy.queue().await.expect("the simulator answers /queue");
        assert!(
            queue.running.len() + queue.pending.len() <= 1,
            "ComfyUI holds two of our prompts: {queue:?}"
        );
        let (succeeded, failed) = runs.send(Outcome).await.expect("answers");
        assert!(failed.is_empty(), "{failed:?}");
        if succeeded == TASKS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {succeeded} of {TASKS} tasks ran"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(sim.prompts_received(), TASKS);
    sim.stop().await;
}
