//! Stored runs that no live actor drives: a run that no longer validates against the
//! config it is resumed under, a cancel of an unfinished run that was never resumed, and a
//! run resumed on an older ComfyUI that ran its prompt under an id the store never got.
//!
//! Guards against runs that stayed `running` forever after a restart on a config without
//! a node they need, answered 409 ("has already ended") to a cancel, or had their GPU work
//! done twice because the daemon died between posting a prompt and recording its answer.

use multiplex_actors::activity::{Activity, EventsSince, Filter};
use multiplex_actors::cluster::Cluster;
use multiplex_actors::comfyui::{submit_job, ComfyClient};
use multiplex_actors::config::{ClusterConfig, NodeConfig};
use multiplex_actors::store::{RemoteRef, RunRecord, RunState, StepRecord, StepState, Store};
use multiplex_actors::workflow::ComfyJob;
use multiplex_actors::workflow::TemplateLibrary;
use multiplex_sim::comfyui::{ComfySim, ComfySimConfig};
use serde_json::json;

/// A cluster with no nodes at all, so no image or narration step validates.
fn start_cluster(data_dir: &std::path::Path) -> Cluster {
    let config = ClusterConfig {
        default_image_template: "flux-txt2img".into(),
        default_video_template: "wan21-i2v".into(),
        nodes: Vec::new(),
        node_grace_ms: 1_000,
        max_steps: multiplex_actors::config::DEFAULT_MAX_STEPS,
    };
    let templates = TemplateLibrary::builtin().expect("the built-in templates load");
    let store = Store::open(data_dir).expect("the store opens in a temporary directory");
    Cluster::start(config, templates, store).expect("a cluster without tunnels starts")
}

/// A run caught mid-step: the image step running on img-a, the narration waiting for it.
fn running_record(id: &str) -> RunRecord {
    let mut still = StepRecord::new("still", "image");
    still.state = StepState::Running;
    still.node = Some("img-a".into());
    still.attempts = 1;
    still.remote = Some(RemoteRef::Comfyui {
        prompt_id: "prompt-1".into(),
        server_prompt_id: None,
    });
    RunRecord {
        id: id.to_string(),
        name: "still and voice".into(),
        state: RunState::Running,
        created_at: time::OffsetDateTime::now_utc(),
        finished_at: None,
        error: None,
        document: json!({
            "name": "still and voice",
            "nodes": [
                {"id": "still", "type": "image", "data": {"prompt": "dawn", "steps": 20}},
                {"id": "voice", "type": "narration", "data": {"mode": "visual"}}
            ],
            "edges": [{"id": "e1", "source": "still", "target": "voice"}]
        }),
        steps: vec![still, StepRecord::new("voice", "narration")],
    }
}

fn step<'a>(run: &'a RunRecord, id: &str) -> &'a StepRecord {
    run.step(id)
        .unwrap_or_else(|| panic!("run has no step {id}"))
}

#[actix_rt::test]
async fn a_stored_run_that_no_longer_validates_is_failed_with_its_issues() {
    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let cluster = start_cluster(dir.path());
    let id = "0190a000-0000-7000-8000-000000000001";
    cluster
        .store()
        .save_run(&running_record(id))
        .await
        .expect("the record is stored");

    let resumed = cluster
        .resume_unfinished()
        .await
        .expect("resuming reads the store");
    assert_eq!(resumed, 0);
    assert_eq!(cluster.live_runs(), 0);

    let run = cluster.run(id).await.expect("the run is still listed");
    assert_eq!(run.state, RunState::Failed);
    assert!(run.finished_at.is_some());
    let error = run.error.clone().unwrap_or_default();
    assert!(
        error.contains("no longer validates against this configuration"),
        "{error}"
    );
    assert!(
        error.contains("node voice"),
        "the issue names its node: {error}"
    );
    assert!(
        error.contains("prompt prompt-1 on img-a") && error.contains("cannot be followed"),
        "the error says the work sent to img-a is not followed: {error}"
    );
    assert_eq!(step(&run, "still").state, StepState::Failed);
    assert_eq!(step(&run, "voice").state, StepState::Skipped);

    let (events, _) = cluster
        .hub()
        .send(EventsSince {
            after: 0,
            filter: Filter::Run(id.into()),
            limit: 100,
        })
        .await
        .expect("the hub answers");
    let published = events.iter().any(|event| {
        matches!(&event.activity,
            Activity::RunState { state: RunState::Failed, error: Some(e), .. } if *e == error)
    });
    assert!(published, "the failure is published as activity");
}

#[actix_rt::test]
async fn cancelling_a_stored_unfinished_run_without_an_actor_cancels_it() {
    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let cluster = start_cluster(dir.path());
    let id = "0190a000-0000-7000-8000-000000000002";
    cluster
        .store()
        .save_run(&running_record(id))
        .await
        .expect("the record is stored");

    let answered = cluster.cancel(id).await.expect("the cancel is accepted");
    assert_eq!(answered.state, RunState::Cancelled);

    let stored = cluster
        .store()
        .get_run(id)
        .expect("the store reads")
        .expect("the run is stored");
    assert_eq!(stored.state, RunState::Cancelled);
    assert_eq!(step(&stored, "still").state, StepState::Cancelled);
    assert_eq!(step(&stored, "voice").state, StepState::Skipped);

    let again = cluster.cancel(id).await;
    assert!(
        matches!(
            again,
            Err(multiplex_actors::cluster::ClusterError::AlreadyEnded { .. })
        ),
        "a second cancel finds it ended: {again:?}"
    );
}

/// A small blur of an empty image: a real prompt the simulator runs in a few steps.
fn blur_job() -> ComfyJob {
    let prompt = json!({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3,
              "sigma": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "mx"}}
    });
    ComfyJob {
        prompt,
        uploads: Vec::new(),
        output_kind: multiplex_actors::artifact::ArtifactKind::Image,
    }
}

/// A cluster whose one image node, img-a, is `sim`.
fn image_cluster(sim: &ComfySim, data_dir: &std::path::Path) -> Cluster {
    let node: NodeConfig = serde_json::from_value(json!({
        "name": "img-a",
        "gpus": [{"model": "RTX A6000", "vram_mb": 49140}],
        "comfyui": {"url": sim.url().to_string(), "capabilities": ["image"]}
    }))
    .expect("a node config");
    let config = ClusterConfig {
        default_image_template: "flux-txt2img".into(),
        default_video_template: "wan21-i2v".into(),
        nodes: vec![node],
        node_grace_ms: 30_000,
        max_steps: multiplex_actors::config::DEFAULT_MAX_STEPS,
    };
    let templates = TemplateLibrary::builtin().expect("the built-in templates load");
    let store = Store::open(data_dir).expect("the store opens");
    Cluster::start(config, templates, store).expect("the cluster starts")
}

/// A one-step image run as the store held it when the daemon died.
fn one_still(id: &str, still: StepRecord) -> RunRecord {
    RunRecord {
        id: id.to_string(),
        name: "one still".into(),
        state: RunState::Running,
        created_at: time::OffsetDateTime::now_utc(),
        finished_at: None,
        error: None,
        document: json!({
            "name": "one still",
            "nodes": [{"id": "still", "type": "image", "data": {"prompt": "dawn", "steps": 4}}],
            "edges": []
        }),
        steps: vec![still],
    }
}

/// A simulator (`step_ms` per node) that a daemon, dead since, sent [`blur_job`] to under
/// our id; with a client to it and that id.
async fn posted_by_a_daemon_that_died(step_ms: u64) -> (ComfySim, ComfyClient, String) {
    let config = ComfySimConfig {
        step_ms,
        model_load_ms: 1,
        ..ComfySimConfig::default()
    };
    let addr = "127.0.0.1:0".parse().expect("a socket address");
    let sim = ComfySim::start(config, addr)
        .await
        .expect("the simulator starts");
    let ours = uuid::Uuid::new_v4().to_string();
    let client = ComfyClient::new(sim.url());
    submit_job(&client, &blur_job(), &ours, "the-daemon-that-died", |_| {})
        .await
        .expect("the prompt is accepted");
    (sim, client, ours)
}

/// Polls `ready` until it holds, failing with `what` after a generous bound.
async fn eventually<F, Fut>(what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready().await {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Stores `record`, resumes it, and answers it once it has ended.
async fn resume_to_the_end(cluster: &Cluster, record: &RunRecord) -> RunRecord {
    cluster.store().save_run(record).await.expect("stored");
    assert_eq!(cluster.resume_unfinished().await.expect("resumed"), 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let run = cluster.run(&record.id).await.expect("the run is listed");
        if run.state.is_terminal() {
            return run;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "run never ended: {run:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn a_prompt_posted_before_its_server_id_was_recorded_is_adopted_not_posted_again() {
    // An older ComfyUI, minting its own prompt ids.
    let mut sim_config = ComfySimConfig {
        step_ms: 5,
        model_load_ms: 1,
        ..ComfySimConfig::default()
    };
    sim_config.switches.mint_prompt_ids = true;
    let addr = "127.0.0.1:0".parse().expect("a socket address");
    let sim = ComfySim::start(sim_config, addr)
        .await
        .expect("the simulator starts");

    // The daemon that died had posted the prompt under our id (in the extra data too) and
    // never recorded the server's answer.
    let ours = uuid::Uuid::new_v4().to_string();
    let client = ComfyClient::new(sim.url());
    let server_id = submit_job(&client, &blur_job(), &ours, "the-daemon-that-died", |_| {})
        .await
        .expect("the prompt is accepted");
    assert_ne!(server_id, ours);

    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let cluster = image_cluster(&sim, dir.path());
    let id = "0190a000-0000-7000-8000-000000000003";
    let mut still = StepRecord::new("still", "image");
    still.state = StepState::Submitted;
    still.node = Some("img-a".into());
    still.attempts = 1;
    still.remote = Some(RemoteRef::Comfyui {
        prompt_id: ours.clone(),
        server_prompt_id: None,
    });
    let run = resume_to_the_end(&cluster, &one_still(id, still)).await;

    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    let still = step(&run, "still");
    assert_eq!(still.artifacts.len(), 1);
    assert_eq!(
        still.remote,
        Some(RemoteRef::Comfyui {
            prompt_id: ours.clone(),
            server_prompt_id: Some(server_id.clone()),
        }),
        "the server's id was adopted and recorded"
    );
    let stored = cluster.store().get_run(id).expect("reads").expect("stored");
    assert_eq!(
        stored.step("still").and_then(|s| s.remote.clone()),
        still.remote
    );
    assert_eq!(sim.prompts_received(), 1, "the prompt was not posted again");
    assert_eq!(sim.prompts_by_id().get(&ours), Some(&1));
    sim.stop().await;
}

/// A step queued again after its node went away, to be checked there first, when the
/// daemon died before it was placed: its prompt had finished on that node meanwhile. The
/// restarted daemon collects it there instead of running the step afresh.
#[actix_rt::test]
async fn a_step_queued_to_check_the_node_it_left_checks_there_after_a_restart() {
    let (sim, client, ours) = posted_by_a_daemon_that_died(1).await;
    eventually("the prompt finished", || {
        let (client, ours) = (&client, &ours);
        async move {
            client
                .history(ours)
                .await
                .expect("history answers")
                .is_some()
        }
    })
    .await;

    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let cluster = image_cluster(&sim, dir.path());
    let id = "0190a000-0000-7000-8000-000000000004";
    let mut still = StepRecord::new("still", "image");
    still.state = StepState::Queued;
    still.attempts = 2;
    still.check_first_on = Some("img-a".into());
    still.remote = Some(RemoteRef::Comfyui {
        prompt_id: ours.clone(),
        server_prompt_id: None,
    });
    let run = resume_to_the_end(&cluster, &one_still(id, still)).await;

    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    let still = step(&run, "still");
    assert_eq!(still.artifacts.len(), 1, "{still:?}");
    assert_eq!(
        still.check_first_on, None,
        "placed, so nothing is left to check"
    );
    assert_eq!(sim.prompts_received(), 1, "{:?}", sim.prompts_by_id());
    sim.stop().await;
}

/// A run cancelled right after a restart, before its resumed step reached the node again
/// (the node has not even answered its first probe): the prompt the daemon had sent before
/// it died is still interrupted on the node, not left to run for a cancelled run.
#[actix_rt::test]
async fn a_run_cancelled_before_its_step_is_taken_up_again_still_stops_its_prompt() {
    let (sim, client, ours) = posted_by_a_daemon_that_died(500).await;
    eventually("the prompt started", || {
        let (client, ours) = (&client, &ours);
        async move {
            client
                .queue()
                .await
                .expect("queue answers")
                .is_running(ours)
        }
    })
    .await;

    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let cluster = image_cluster(&sim, dir.path());
    let id = "0190a000-0000-7000-8000-000000000005";
    let mut still = StepRecord::new("still", "image");
    still.state = StepState::Running;
    still.node = Some("img-a".into());
    still.attempts = 1;
    still.remote = Some(RemoteRef::Comfyui {
        prompt_id: ours.clone(),
        server_prompt_id: None,
    });
    cluster
        .store()
        .save_run(&one_still(id, still))
        .await
        .expect("stored");
    assert_eq!(cluster.resume_unfinished().await.expect("resumed"), 1);
    let cancelled = cluster.cancel(id).await.expect("cancelled");
    assert_eq!(cancelled.state, RunState::Cancelled);

    eventually("the prompt was interrupted", || {
        let interrupted = sim.interrupted_prompts() == [ours.clone()];
        async move { interrupted }
    })
    .await;
    assert_eq!(sim.prompts_received(), 1);
    sim.stop().await;
}
