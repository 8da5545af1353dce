//! The ComfyUI driver against the ComfyUI simulator, over real sockets.
//!
//! Each test plays the node actor's part: one event socket per server, its events fanned out
//! through a broadcast channel, and `run_job` following one prompt on it. What they guard:
//! outputs reach the store, uploads are injected under the name ComfyUI returns, errors name
//! the node at fault, previews bigger than actix's default frame limit get through, and a job
//! whose event channel is gone still finishes by polling. The `resume_*` tests guard the
//! exactly-once rule of docs/durability.md: a prompt picked up again after a restart is
//! collected or followed, never posted a second time, and one the node forgot is `Lost`.
//! The `minting_*` tests play an older ComfyUI that ignores our prompt id and mints its own:
//! the job follows the server's id, `locate` finds the prompt by our id in the extra data of
//! the queue and recent history, and `cancel` interrupts only a prompt that is ours.

use std::net::SocketAddr;

use futures_util::StreamExt;
use multiplex_actors::artifact::ArtifactKind;
use multiplex_actors::comfyui::{
    cancel, connect_events, locate, resume_job, run_job, submit_job, ComfyClient, ComfyEvent,
    JobError, JobLookup, JobProgress,
};
use multiplex_actors::store::Store;
use multiplex_actors::workflow::{ComfyJob, UploadSlot};
use multiplex_sim::comfyui::{ComfyControl, ComfySim, ComfySimConfig};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// A simulated ComfyUI plus what a node keeps for it.
struct Harness {
    sim: ComfySim,
    client: ComfyClient,
    client_id: String,
    events: broadcast::Sender<ComfyEvent>,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(config: ComfySimConfig) -> Harness {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
        let sim = ComfySim::start(config, addr)
            .await
            .expect("simulator starts");
        let client_id = uuid::Uuid::new_v4().simple().to_string();
        let mut stream = connect_events(&sim.url(), &client_id)
            .await
            .expect("socket opens");
        assert_eq!(stream.sid(), Some(client_id.as_str()));
        let (events, _) = broadcast::channel(4096);
        let sender = events.clone();
        let (url, id) = (sim.url(), client_id.clone());
        actix_rt::spawn(async move {
            loop {
                while let Some(Ok(event)) = stream.next().await {
                    let _ = sender.send(event);
                }
                // Like the node: reconnect with the same client id (j_reconnect).
                stream = match connect_events(&url, &id).await {
                    Ok(stream) => stream,
                    Err(_) => return,
                };
            }
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store opens");
        Harness {
            client: ComfyClient::new(sim.url()),
            sim,
            client_id,
            events,
            store,
            _dir: dir,
        }
    }

    async fn run(
        &self,
        job: &ComfyJob,
    ) -> (
        Result<Vec<multiplex_actors::artifact::ArtifactMeta>, JobError>,
        Vec<JobProgress>,
    ) {
        let prompt_id = uuid::Uuid::new_v4().to_string();
        let mut progress = Vec::new();
        let outcome = run_job(
            &self.client,
            job,
            &prompt_id,
            &self.client_id,
            self.events.subscribe(),
            self.store.artifacts(),
            |p| progress.push(p),
        )
        .await;
        (outcome, progress)
    }
}

impl Harness {
    /// Posts `prompt` the way an earlier daemon would have, and returns its id.
    async fn post(&self, prompt: &Value) -> String {
        let prompt_id = uuid::Uuid::new_v4().to_string();
        let accepted = self
            .client
            .submit(prompt, &prompt_id, &self.client_id, None)
            .await
            .expect("prompt accepted");
        assert_eq!(accepted.prompt_id, prompt_id);
        prompt_id
    }

    /// Posts `prompt` under a new id of ours as the node does (our id in the extra data too),
    /// on a server that may mint its own; returns ours and the server's.
    async fn post_tagged(&self, prompt: &Value) -> (String, String) {
        let ours = uuid::Uuid::new_v4().to_string();
        let server_id = submit_job(
            &self.client,
            &job(prompt.clone()),
            &ours,
            &self.client_id,
            |_| {},
        )
        .await
        .expect("prompt accepted");
        (ours, server_id)
    }

    async fn resume(
        &self,
        prompt_id: &str,
        on_progress: impl FnMut(JobProgress),
    ) -> Result<Vec<multiplex_actors::artifact::ArtifactMeta>, JobError> {
        resume_job(
            &self.client,
            prompt_id,
            ArtifactKind::Image,
            self.events.subscribe(),
            self.store.artifacts(),
            on_progress,
        )
        .await
    }
}

/// Polls `done` every 20 ms for up to 10 s.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn job(prompt: Value) -> ComfyJob {
    ComfyJob {
        prompt,
        uploads: Vec::new(),
        output_kind: ArtifactKind::Image,
    }
}

/// a_basic: EmptyImage -> ImageInvert -> SaveImage.
fn basic_prompt() -> Value {
    json!({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16744448}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "mx_a"}}
    })
}

fn fast() -> ComfySimConfig {
    ComfySimConfig {
        step_ms: 1,
        model_load_ms: 1,
        ..ComfySimConfig::default()
    }
}

#[actix_rt::test]
async fn basic_job_stores_the_png() {
    let node = Harness::start(fast()).await;
    let (outcome, progress) = node.run(&job(basic_prompt())).await;
    let artifacts = outcome.expect("job succeeds");

    assert_eq!(artifacts.len(), 1);
    let png = &artifacts[0];
    assert_eq!(png.kind, ArtifactKind::Image);
    assert_eq!(png.mime, "image/png");
    let bytes = std::fs::read(node.store.artifacts().path(&png.id)).expect("stored file");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(bytes.len() as u64, png.size);

    assert!(matches!(
        progress.first(),
        Some(JobProgress::Submitted { .. })
    ));
    assert!(progress.contains(&JobProgress::Started));
    assert!(progress.contains(&JobProgress::Executing { node: "3".into() }));
    assert_eq!(node.sim.prompts_received(), 1);
    node.sim.stop().await;
}

#[actix_rt::test]
async fn uploaded_input_is_injected_under_the_returned_name() {
    let node = Harness::start(fast()).await;
    let (first, _) = node.run(&job(basic_prompt())).await;
    let source = node
        .store
        .artifacts()
        .path(&first.expect("first job")[0].id);

    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "mx_b"}}
    });
    let upload = ComfyJob {
        prompt,
        uploads: vec![UploadSlot {
            path: source,
            filename: "mx_input.png".into(),
            node_id: "1".into(),
            input_name: "image".into(),
        }],
        output_kind: ArtifactKind::Image,
    };
    let (outcome, _) = node.run(&upload).await;
    let artifacts = outcome.expect("LoadImage job succeeds");
    assert_eq!(artifacts.len(), 1);
    assert_eq!(artifacts[0].mime, "image/png");

    // A missing local file is a local error naming the path, before anything is submitted.
    let mut missing = upload.clone();
    missing.uploads[0].path = "/nonexistent/mx.png".into();
    let (outcome, _) = node.run(&missing).await;
    let err = outcome.expect_err("missing input fails");
    assert!(matches!(err, JobError::Local { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/mx.png"));
    assert_eq!(node.sim.prompts_received(), 2);
    node.sim.stop().await;
}

#[actix_rt::test]
async fn validation_error_is_rejected_with_node_errors() {
    let node = Harness::start(fast()).await;
    let mut prompt = basic_prompt();
    prompt["2"]["inputs"] = json!({});
    let (outcome, _) = node.run(&job(prompt)).await;
    let err = outcome.expect_err("rejected");
    let JobError::Rejected {
        ref node_errors,
        ref message,
        ..
    } = err
    else {
        panic!("expected a rejection, got {err:?}");
    };
    assert_eq!(node_errors["2"]["class_type"], "ImageInvert");
    assert!(message.contains("node 2 ImageInvert"), "{message}");
    assert!(!err.is_retryable());
    node.sim.stop().await;
}

#[actix_rt::test]
async fn partly_invalid_prompt_warns_and_runs_the_valid_branch() {
    let node = Harness::start(fast()).await;
    // c_invalid, one_bad_branch_one_good_branch: 200 with node_errors for node 2.
    let prompt = json!({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bad"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ok"}}
    });
    let (outcome, progress) = node.run(&job(prompt)).await;
    let artifacts = outcome.expect("the valid branch runs");
    assert_eq!(artifacts.len(), 1);
    let warning = progress.iter().find_map(|p| match p {
        JobProgress::Warning { message, .. } => Some(message.clone()),
        _ => None,
    });
    assert!(warning.expect("a warning").contains("ImageInvert"));
    node.sim.stop().await;
}

#[actix_rt::test]
async fn execution_error_names_the_node() {
    let node = Harness::start(fast()).await;
    // g_exec_error: ImageBatch of an RGB and an RGBA image fails at run time.
    let prompt = json!({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 1052688}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 32, "height": 32}},
        "3": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["2", 0]}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "g"}}
    });
    let (outcome, _) = node.run(&job(prompt)).await;
    let err = outcome.expect_err("fails at run time");
    let JobError::Execution {
        ref node_id,
        ref node_type,
        ..
    } = err
    else {
        panic!("expected an execution error, got {err:?}");
    };
    assert_eq!(node_id.as_deref(), Some("4"));
    assert_eq!(node_type.as_deref(), Some("ImageBatch"));
    assert!(err.to_string().contains("node 4 (ImageBatch)"), "{err}");
    assert!(!err.is_out_of_memory());

    node.sim.control(ComfyControl {
        oom_next: Some(1),
        ..ComfyControl::default()
    });
    let (outcome, _) = node.run(&job(basic_prompt())).await;
    let err = outcome.expect_err("out of memory");
    assert!(err.is_out_of_memory(), "{err:?}");
    node.sim.stop().await;
}

/// A KSampler graph, so the simulator sends a preview per step.
fn sampler_prompt(steps: u64) -> Value {
    json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 1, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ks"}}
    })
}

#[actix_rt::test]
async fn previews_larger_than_64_kib_arrive() {
    let config = ComfySimConfig {
        preview_bytes: 200_000,
        ..fast()
    };
    let node = Harness::start(config).await;
    let (outcome, progress) = node.run(&job(sampler_prompt(3))).await;
    outcome.expect("sampler job succeeds");

    let previews: Vec<usize> = progress
        .iter()
        .filter_map(|p| match p {
            JobProgress::Preview { bytes, mime, .. } if mime.starts_with("image/") => {
                Some(bytes.len())
            }
            _ => None,
        })
        .collect();
    assert_eq!(previews.len(), 3, "one preview per step");
    assert!(previews.iter().all(|len| *len > 64 * 1024), "{previews:?}");
    let steps = progress
        .iter()
        .filter(|p| matches!(p, JobProgress::Progress { .. }))
        .count();
    assert_eq!(steps, 3);
    node.sim.stop().await;
}

#[actix_rt::test]
async fn a_closed_event_channel_falls_back_to_polling() {
    let node = Harness::start(fast()).await;
    let (sender, receiver) = broadcast::channel(16);
    drop(sender);
    let outcome = run_job(
        &node.client,
        &job(basic_prompt()),
        &uuid::Uuid::new_v4().to_string(),
        &node.client_id,
        receiver,
        node.store.artifacts(),
        |_| {},
    )
    .await;
    assert_eq!(outcome.expect("finished by polling").len(), 1);
    node.sim.stop().await;
}

#[actix_rt::test]
async fn rest_calls_match_the_recordings() {
    let node = Harness::start(fast()).await;
    let stats = node.client.system_stats().await.expect("system stats");
    assert!(!stats.devices.is_empty());
    assert!(node.client.queue().await.expect("queue").running.is_empty());
    assert_eq!(
        node.client
            .history("00000000-0000-0000-0000-000000000000")
            .await
            .unwrap(),
        None
    );
    node.client
        .interrupt("00000000-0000-0000-0000-000000000000")
        .await
        .expect("interrupt");
    node.client
        .delete_queued(&["not-a-queued-id".into()])
        .await
        .expect("delete");
    node.sim.stop().await;
}

#[actix_rt::test]
async fn a_prompt_the_server_forgot_is_lost() {
    let node = Harness::start(fast()).await;
    // No events, so the job polls; the server "restarts" right after accepting the prompt.
    let (sender, receiver) = broadcast::channel(16);
    drop(sender);
    let restart = || {
        node.sim.control(ComfyControl {
            restart: true,
            ..ComfyControl::default()
        })
    };
    let outcome = run_job(
        &node.client,
        &job(sampler_prompt(10_000)),
        &uuid::Uuid::new_v4().to_string(),
        &node.client_id,
        receiver,
        node.store.artifacts(),
        |progress| {
            if matches!(progress, JobProgress::Submitted { .. }) {
                restart();
            }
        },
    )
    .await;
    let err = outcome.expect_err("the prompt is gone");
    assert!(matches!(err, JobError::Lost { .. }), "{err:?}");
    assert!(err.is_retryable());
    node.sim.stop().await;
}

#[actix_rt::test]
async fn a_job_survives_its_socket_dropping() {
    let node = Harness::start(fast()).await;
    // The simulator closes the socket after the first node and never resends that prompt's
    // events: the reconnection's first status makes the job check the history.
    node.sim.control(ComfyControl {
        drop_socket_next: Some(1),
        ..ComfyControl::default()
    });
    let (outcome, _) = node.run(&job(basic_prompt())).await;
    assert_eq!(outcome.expect("finished after the reconnect").len(), 1);
    assert!(node.sim.ws_connections() >= 2);
    node.sim.stop().await;
}

#[actix_rt::test]
async fn an_interrupted_prompt_reports_interrupted() {
    let node = Harness::start(fast()).await;
    let prompt_id = uuid::Uuid::new_v4().to_string();
    let (client, id) = (node.client.clone(), prompt_id.clone());
    let mut asked = false;
    let outcome = run_job(
        &node.client,
        &job(sampler_prompt(10_000)),
        &prompt_id,
        &node.client_id,
        node.events.subscribe(),
        node.store.artifacts(),
        |progress| {
            // e_interrupt: a targeted interrupt while the sampler runs.
            if matches!(progress, JobProgress::Progress { .. }) && !asked {
                asked = true;
                let (client, id) = (client.clone(), id.clone());
                actix_rt::spawn(async move { client.interrupt(&id).await });
            }
        },
    )
    .await;
    let err = outcome.expect_err("interrupted");
    assert!(matches!(err, JobError::Interrupted { .. }), "{err:?}");
    assert!(!err.is_retryable());
    node.sim.stop().await;
}

#[actix_rt::test]
async fn resuming_a_finished_prompt_collects_without_posting() {
    let node = Harness::start(fast()).await;
    let prompt_id = node.post(&basic_prompt()).await;
    eventually("the prompt is in history", || async {
        matches!(node.client.history(&prompt_id).await, Ok(Some(_)))
    })
    .await;

    let mut progress = Vec::new();
    let artifacts = node
        .resume(&prompt_id, |p| progress.push(p))
        .await
        .expect("outputs collected");
    assert_eq!(artifacts.len(), 1);
    assert!(
        !progress.contains(&JobProgress::Started),
        "collected, not followed: {progress:?}"
    );
    assert_eq!(node.sim.prompts_received(), 1, "nothing posted again");
    assert_eq!(node.sim.prompts_by_id().get(&prompt_id), Some(&1));
    assert!(node.sim.duplicate_prompts().is_empty());
    node.sim.stop().await;
}

#[actix_rt::test]
async fn resuming_a_running_prompt_follows_it_to_the_end() {
    let node = Harness::start(ComfySimConfig {
        step_ms: 5,
        ..fast()
    })
    .await;
    let prompt_id = node.post(&sampler_prompt(60)).await;
    let mut progress = Vec::new();
    let artifacts = node
        .resume(&prompt_id, |p| progress.push(p))
        .await
        .expect("followed to the end");
    assert_eq!(artifacts.len(), 1);
    assert!(
        progress
            .iter()
            .any(|p| matches!(p, JobProgress::Progress { .. })),
        "sampler steps reported: {progress:?}"
    );
    assert_eq!(node.sim.prompts_received(), 1);
    assert!(node.sim.duplicate_prompts().is_empty());
    node.sim.stop().await;
}

#[actix_rt::test]
async fn resuming_an_unknown_prompt_is_lost_quickly() {
    let node = Harness::start(fast()).await;
    let started = std::time::Instant::now();
    let err = node
        .resume(&uuid::Uuid::new_v4().to_string(), |_| {})
        .await
        .expect_err("never posted");
    assert!(matches!(err, JobError::Lost { .. }), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(node.sim.prompts_received(), 0);
    node.sim.stop().await;
}

#[actix_rt::test]
async fn a_restart_while_resuming_is_lost() {
    let node = Harness::start(fast()).await;
    let prompt_id = node.post(&sampler_prompt(10_000)).await;
    let mut restarted = false;
    let err = node
        .resume(&prompt_id, |progress| {
            if matches!(progress, JobProgress::Progress { .. }) && !restarted {
                restarted = true;
                node.sim.control(ComfyControl {
                    restart: true,
                    ..ComfyControl::default()
                });
            }
        })
        .await
        .expect_err("the restarted server forgot the prompt");
    assert!(restarted);
    assert!(matches!(err, JobError::Lost { .. }), "{err:?}");
    assert_eq!(node.sim.prompts_received(), 1);
    node.sim.stop().await;
}

/// A ComfyUI process that goes away and comes back on the same port within
/// `TRANSPORT_GRACE`: the job reconciles (here: the new process never heard of the prompt)
/// instead of failing on the refused connections in between.
#[actix_rt::test]
async fn a_node_down_for_a_moment_is_reconciled_not_failed() {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
    let sim = ComfySim::start(fast(), addr)
        .await
        .expect("simulator starts");
    let addr = sim.addr();
    let client = ComfyClient::new(sim.url());
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store opens");
    let prompt_id = uuid::Uuid::new_v4().to_string();
    client
        .submit(&sampler_prompt(10_000), &prompt_id, "c1", None)
        .await
        .expect("prompt accepted");
    // No socket: the job polls, so it meets the outage on a REST call.
    let (sender, events) = broadcast::channel(16);
    drop(sender);
    let resumed = resume_job(
        &client,
        &prompt_id,
        ArtifactKind::Image,
        events,
        store.artifacts(),
        |_| {},
    );
    let outage = async {
        eventually("the prompt runs", || async {
            client
                .queue()
                .await
                .is_ok_and(|queue| queue.running.contains(&prompt_id))
        })
        .await;
        sim.stop().await;
        // While "down", the port drops every connection; seeing two proves a retry.
        let down = tokio::net::TcpListener::bind(addr)
            .await
            .expect("port free");
        for _ in 0..2 {
            let (connection, _) = down.accept().await.expect("the job calls again");
            drop(connection);
        }
        drop(down);
        ComfySim::start(fast(), addr)
            .await
            .expect("same port again")
    };
    let (outcome, again) = tokio::join!(resumed, outage);
    let err = outcome.expect_err("the new process does not know the prompt");
    assert!(matches!(err, JobError::Lost { .. }), "{err:?}");
    assert_eq!(again.prompts_received(), 0);
    again.stop().await;
}

/// Newer ComfyUI answers `GET /api/jobs/{id}`; 0.3.64 (the simulator's default) does not,
/// and every other test here runs on that fallback.
#[actix_rt::test]
async fn resuming_uses_the_jobs_route_where_the_server_has_it() {
    let node = Harness::start(ComfySimConfig {
        jobs_api: true,
        step_ms: 5,
        ..fast()
    })
    .await;
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(node.client.job(&unknown).await.unwrap(), JobLookup::Unknown);
    let prompt_id = node.post(&sampler_prompt(60)).await;
    let artifacts = node.resume(&prompt_id, |_| {}).await.expect("followed");
    assert_eq!(artifacts.len(), 1);
    match node.client.job(&prompt_id).await.unwrap() {
        JobLookup::Finished(entry) => {
            assert!(!entry.is_error() && !entry.deliverables().is_empty())
        }
        other => panic!("expected a finished job, got {other:?}"),
    }
    let again = node.resume(&prompt_id, |_| {}).await.expect("collected");
    assert_eq!(again.len(), 1);
    assert_eq!(node.sim.prompts_received(), 1);
    let err = node
        .resume(&unknown, |_| {})
        .await
        .expect_err("never posted");
    assert!(matches!(err, JobError::Lost { .. }), "{err:?}");
    node.sim.stop().await;

    let old = Harness::start(fast()).await;
    assert_eq!(
        old.client.job(&unknown).await.unwrap(),
        JobLookup::Unsupported
    );
    old.sim.stop().await;
}

fn minting() -> ComfySimConfig {
    let mut config = fast();
    config.switches.mint_prompt_ids = true;
    config
}

#[actix_rt::test]
async fn minting_servers_are_followed_by_their_own_id() {
    let node = Harness::start(minting()).await;
    let (outcome, progress) = node.run(&job(basic_prompt())).await;
    let artifacts = outcome.expect("job succeeds");
    assert_eq!(artifacts.len(), 1);
    let Some(JobProgress::Submitted { prompt_id, .. }) = progress.first() else {
        panic!("no submission reported: {progress:?}");
    };
    assert!(
        node.client
            .history(prompt_id)
            .await
            .expect("history")
            .is_some(),
        "the reported id is the server's"
    );
    assert!(progress.contains(&JobProgress::Started), "{progress:?}");
    assert_eq!(node.sim.prompts_received(), 1);
    node.sim.stop().await;
}

#[actix_rt::test]
async fn minting_servers_prompts_are_located_by_our_id() {
    let node = Harness::start(ComfySimConfig {
        step_ms: 5,
        ..minting()
    })
    .await;
    let (running, running_server) = node.post_tagged(&sampler_prompt(60)).await;
    let (pending, pending_server) = node.post_tagged(&basic_prompt()).await;
    assert_ne!(running, running_server, "the server minted its own id");
    // By our id alone, the server knows neither.
    assert!(matches!(
        node.resume(&running, |_| {}).await,
        Err(JobError::Lost { .. })
    ));
    let found = locate(&node.client, &running).await.expect("located");
    assert_eq!(found.as_deref(), Some(running_server.as_str()), "running");
    let found = locate(&node.client, &pending).await.expect("located");
    assert_eq!(found.as_deref(), Some(pending_server.as_str()), "pending");
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(locate(&node.client, &unknown).await.expect("looked"), None);

    // Finished: found in the recent history by the extra data of its prompt tuple.
    eventually("both prompts finish", || async {
        matches!(node.client.history(&pending_server).await, Ok(Some(_)))
    })
    .await;
    let found = locate(&node.client, &running).await.expect("located");
    assert_eq!(found.as_deref(), Some(running_server.as_str()), "finished");
    let artifacts = node
        .resume(&running_server, |_| {})
        .await
        .expect("collected by the server's id");
    assert_eq!(artifacts.len(), 1);
    assert_eq!(node.sim.prompts_received(), 2, "nothing posted again");
    assert!(node.sim.duplicate_prompts().is_empty());
    node.sim.stop().await;
}

#[actix_rt::test]
async fn minting_servers_cancel_only_our_prompt() {
    let node = Harness::start(ComfySimConfig {
        step_ms: 5,
        ..minting()
    })
    .await;
    // Another run's prompt runs; ours waits behind it.
    let (theirs, theirs_server) = node.post_tagged(&sampler_prompt(10_000)).await;
    let (ours, ours_server) = node.post_tagged(&sampler_prompt(10_000)).await;
    eventually("the other prompt runs", || async {
        node.client
            .queue()
            .await
            .is_ok_and(|queue| queue.is_running(&theirs_server))
    })
    .await;
    let done = cancel(&node.client, &ours, None).await.expect("cancelled");
    assert_eq!(done.dequeued, vec![ours_server.clone()]);
    assert_eq!(
        done.interrupted, None,
        "ours was not running: nothing interrupted"
    );
    assert_eq!(node.sim.interrupts_received(), 0);
    let queue = node.client.queue().await.expect("queue");
    assert!(queue.is_running(&theirs_server) && !queue.contains(&ours_server));

    // Running: interrupted by the server's id, known or found by our id.
    let done = cancel(&node.client, &theirs, Some(&theirs_server))
        .await
        .expect("cancelled");
    assert_eq!(done.interrupted.as_deref(), Some(theirs_server.as_str()));
    eventually("the prompt ends interrupted", || async {
        node.sim.interrupted_prompts() == [theirs_server.clone()]
    })
    .await;
    assert_eq!(node.sim.interrupts_received(), 1);
    node.sim.stop().await;
}
