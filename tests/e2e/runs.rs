//! Workflows that should succeed: the example pipeline, parallel branches, cancel, restart.

use serde_json::{json, Value};

use crate::util::{cluster_config, example, step, TestDaemon};

#[actix_rt::test]
async fn example_pipeline_runs_end_to_end_with_real_artifacts() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let id = test.submit(&example("lighthouse.json")).await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "run: {run}");

    // Every step ran where it should, and each produced what its kind promises.
    assert_eq!(step(&run, "brief")["node"], Value::Null);
    let still = step(&run, "still");
    assert!(
        matches!(still["node"].as_str(), Some("img-a" | "img-b")),
        "{still}"
    );
    assert_eq!(step(&run, "clip")["node"], "vid");
    assert_eq!(step(&run, "voice")["node"], "llm");

    let image = &still["artifacts"][0];
    assert_eq!(image["kind"], "image");
    let png = test
        .http
        .get(test.url(image["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    let bytes = png.bytes().await.unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a real PNG");

    let video = &step(&run, "clip")["artifacts"][0];
    assert_eq!(video["kind"], "video");
    let narration = &step(&run, "voice")["artifacts"][0];
    assert_eq!(narration["kind"], "text");
    let text = test
        .http
        .get(test.url(narration["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert!(!text.text().await.unwrap().trim().is_empty());

    // The output step collects the deliverables of its inputs.
    let delivered = step(&run, "deliver")["artifacts"].as_array().unwrap().len();
    assert_eq!(
        delivered, 3,
        "video, narration and the inverted still: {run}"
    );
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn independent_branches_run_at_the_same_time_on_two_nodes() {
    // Slow image steps, so both are surely in flight together.
    let test = TestDaemon::start(&cluster_config(40, "")).await;
    let id = test.submit(&example("two-branches.json")).await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "run: {run}");

    let images: Vec<&Value> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|step| step["kind"] == "image")
        .collect();
    assert_eq!(images.len(), 2);
    assert_ne!(
        images[0]["node"], images[1]["node"],
        "one branch per node: {run}"
    );
    let (a_start, a_end) = (&images[0]["started_at"], &images[0]["finished_at"]);
    let (b_start, b_end) = (&images[1]["started_at"], &images[1]["finished_at"]);
    let overlap = timestamp(a_start) < timestamp(b_end) && timestamp(b_start) < timestamp(a_end);
    assert!(overlap, "the branches ran one after the other: {run}");
    test.daemon.stop().await;
}

fn timestamp(value: &Value) -> time::OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339")
}

#[actix_rt::test]
async fn activity_stream_shows_each_step_queue_start_progress_and_finish() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let mut activity = test.activity(None).await;
    let id = test.submit(&example("lighthouse.json")).await;
    let seen = activity
        .until(|m| {
            m["type"] == "run_state" && m["run_id"] == id.as_str() && m["state"] == "succeeded"
        })
        .await;
    let states_of = |step: &str| -> Vec<String> {
        seen.iter()
            .filter(|m| m["type"] == "step_state" && m["step_id"] == step)
            .map(|m| m["state"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let still = states_of("still");
    for wanted in ["queued", "assigned", "running", "succeeded"] {
        assert!(still.iter().any(|s| s == wanted), "still went {still:?}");
    }
    let progress = seen
        .iter()
        .any(|m| m["type"] == "step_progress" && m["step_id"] == "still");
    assert!(progress, "no progress for the image step");
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn cancelling_a_running_run_interrupts_it() {
    let test = TestDaemon::start(&cluster_config(200, "")).await;
    let workflow = json!({
        "name": "slow still",
        "nodes": [
            {"id": "brief", "type": "intent", "data": {"prompt": "a slow sunrise"}},
            {"id": "still", "type": "image", "data": {"steps": 200}}
        ],
        "edges": [{"id": "e1", "source": "brief", "target": "still"}]
    });
    let id = test.submit(&workflow).await;
    test.wait_run(&id, |run| step(run, "still")["state"] == "running")
        .await;

    let (status, run) = test
        .post(&format!("/api/workflows/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{run}");
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "cancelled");
    assert_eq!(step(&run, "still")["state"], "cancelled");

    let (status, again) = test
        .post(&format!("/api/workflows/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409, "cancelling an ended run: {again}");
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn a_restarted_daemon_lists_earlier_runs_and_serves_their_artifacts() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let id = test.submit(&example("invert.json")).await;
    let before = test.wait_end(&id).await;
    assert_eq!(before["state"], "succeeded", "{before}");
    let artifact_url = before["steps"][0]["artifacts"][0]["url"]
        .as_str()
        .unwrap()
        .to_string();

    let test = test.restart().await;
    let (_, listing) = test.get("/api/workflows").await;
    let ids: Vec<&str> = listing["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert!(ids.contains(&id.as_str()), "{listing}");
    let (_, after) = test.get(&format!("/api/workflows/{id}")).await;
    assert_eq!(after["state"], "succeeded");

    let response = test.http.get(test.url(&artifact_url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // Range requests work, so players can seek in videos.
    let partial = test
        .http
        .get(test.url(&artifact_url))
        .header("Range", "bytes=0-7")
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), 206);
    assert_eq!(
        partial.bytes().await.unwrap().as_ref(),
        b"\x89PNG\r\n\x1a\n"
    );
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn large_binary_preview_frames_reach_the_activity_stream() {
    // Previews of 100 KB exceed actix's 64 KiB default frame limit on the ComfyUI socket.
    let config = cluster_config(1, "").replace(
        "simulate = { step_ms = 1, model_load_ms = 1 }",
        "simulate = { step_ms = 1, model_load_ms = 1, preview_bytes = 100000 }",
    );
    let test = TestDaemon::start(&config).await;
    let mut activity = test.activity(None).await;
    let id = test.submit(&example("lighthouse.json")).await;
    let seen = activity
        .until(|m| {
            m["type"] == "run_state"
                && m["run_id"] == id.as_str()
                && matches!(m["state"].as_str(), Some("succeeded" | "failed"))
        })
        .await;
    assert_eq!(
        seen.last().unwrap()["state"],
        "succeeded",
        "{:?}",
        seen.last()
    );
    let preview = seen
        .iter()
        .find(|m| m["type"] == "step_preview")
        .expect("previews are forwarded to the activity stream");
    assert!(
        preview["data"].as_str().unwrap().len() > 64 * 1024 * 4 / 3,
        "a large preview"
    );
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn the_websocket_submits_and_cancels_like_rest_does() {
    let test = TestDaemon::start(&cluster_config(200, "")).await;
    let mut socket = test.activity(None).await;

    let invalid = json!({"type": "submit", "request_id": 1,
                         "workflow": {"nodes": [{"id": "x", "type": "nope"}], "edges": []}});
    socket.send(&invalid).await;
    let seen = socket
        .until(|m| m["type"] == "error" && m["request_id"] == 1)
        .await;
    let refusal = seen.last().unwrap();
    assert_eq!(refusal["error"], "invalid_workflow", "{refusal}");
    assert_eq!(refusal["issues"][0]["node"], "x", "{refusal}");

    let workflow = json!({
        "name": "slow still over the socket",
        "nodes": [{"id": "still", "type": "image", "data": {"prompt": "dawn", "steps": 200}}],
        "edges": []
    });
    socket
        .send(&json!({"type": "submit", "request_id": 2, "workflow": workflow}))
        .await;
    let seen = socket
        .until(|m| m["type"] == "submitted" && m["request_id"] == 2)
        .await;
    let id = seen.last().unwrap()["run"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    socket
        .until(|m| {
            m["type"] == "step_state" && m["run_id"] == id.as_str() && m["state"] == "running"
        })
        .await;
    socket
        .send(&json!({"type": "cancel", "request_id": 3, "run_id": id}))
        .await;
    let seen = socket
        .until(|m| m["type"] == "cancelled" && m["request_id"] == 3)
        .await;
    assert_eq!(seen.last().unwrap()["run"]["state"], "cancelled");

    socket
        .send(&json!({"type": "cancel", "request_id": 4, "run_id": id}))
        .await;
    let seen = socket
        .until(|m| m["type"] == "error" && m["request_id"] == 4)
        .await;
    assert_eq!(seen.last().unwrap()["error"], "conflict");

    socket.send(&json!({"type": "dance"})).await;
    let seen = socket
        .until(|m| m["type"] == "error" && m["error"] == "bad_request")
        .await;
    assert!(seen.last().unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("subscribe"));
    test.daemon.stop().await;
}

/// An operator's restart of a node actor mid-step goes through its supervisor: the event
/// socket is opened afresh and the running prompt is followed to its end, not sent again.
#[actix_rt::test]
async fn a_node_actor_restarted_mid_step_follows_its_prompt_without_resending() {
    use multiplex_sim::comfyui::{ComfySim, ComfySimConfig};

    let slow = ComfySimConfig {
        step_ms: 20,
        model_load_ms: 1,
        ..ComfySimConfig::default()
    };
    let sim = ComfySim::start(slow, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let config = format!(
        "[templates]\nimage = \"flux-txt2img\"\n[[nodes]]\nname = \"img\"\n\
         [nodes.comfyui]\nurl = \"{}\"\ncapabilities = [\"image\"]\n",
        sim.url()
    );
    let test = TestDaemon::start(&config).await;
    let workflow = json!({
        "name": "restart mid-step",
        "nodes": [
            {"id": "brief", "type": "intent", "data": {"prompt": "a slow sunrise"}},
            {"id": "still", "type": "image", "data": {"steps": 40}}
        ],
        "edges": [{"id": "e1", "source": "brief", "target": "still"}]
    });
    let id = test.submit(&workflow).await;
    test.wait_run(&id, |run| step(run, "still")["state"] == "running")
        .await;
    let sockets_before = sim.ws_connections();

    let (status, answer) = test.post("/api/nodes/img/restart", &json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["restarts"], 1, "{answer}");
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");

    assert_eq!(sim.prompts_received(), 1, "{:?}", sim.prompts_by_id());
    assert!(
        sim.ws_connections() > sockets_before,
        "the restarted actor opened its own socket"
    );
    let (_, nodes) = test.get("/api/nodes").await;
    assert_eq!(nodes["nodes"][0]["restarts"], 1, "{nodes}");

    let (status, missing) = test.post("/api/nodes/nope/restart", &json!({})).await;
    assert_eq!(status, 404, "{missing}");
    test.daemon.stop().await;
    sim.stop().await;
}
