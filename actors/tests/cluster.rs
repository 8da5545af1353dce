//! Stored runs that no live actor drives: a run that no longer validates against the
//! config it is resumed under, and a cancel of an unfinished run that was never resumed.
//!
//! Guards against runs that stayed `running` forever after a restart on a config without
//! a node they need, and answered 409 ("has already ended") to a cancel.

use multiplex_actors::activity::{Activity, EventsSince, Filter};
use multiplex_actors::cluster::Cluster;
use multiplex_actors::config::ClusterConfig;
use multiplex_actors::store::{RemoteRef, RunRecord, RunState, StepRecord, StepState, Store};
use multiplex_actors::workflow::TemplateLibrary;
use serde_json::json;

/// A cluster with no nodes at all, so no image or narration step validates.
fn start_cluster(data_dir: &std::path::Path) -> Cluster {
    let config = ClusterConfig {
        default_image_template: "flux-txt2img".into(),
        default_video_template: "wan21-i2v".into(),
        nodes: Vec::new(),
        node_grace_ms: 1_000,
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
