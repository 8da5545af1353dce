//! Faults of a ComfyUI node while the daemon keeps running: the server killed and
//! restarted empty, killed for good, a silent socket, a dropped socket, out-of-memory, and
//! a server that refuses the WebSocket upgrade.

use anyhow::ensure;
use multiplex::harness::{ClusterSpec, Harness};
use serde_json::{json, Value};

use crate::{bounded, expect_success, one_image, start, step, within, PATIENCE};

/// Waits until the run's `still` step runs, and returns the node and the prompt id.
async fn still_running(harness: &Harness, id: &str) -> anyhow::Result<(String, String)> {
    let run = harness
        .wait_run(id, PATIENCE, |run| {
            let still = multiplex::harness::step(run, "still");
            still["state"] == "running" && still["remote"]["prompt_id"].is_string()
        })
        .await?;
    let still = step(&run, "still")?;
    let node = still["node"].as_str().unwrap_or_default().to_string();
    let prompt = still["remote"]["prompt_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((node, prompt))
}

fn count(stats: &Value, key: &str) -> u64 {
    stats[key].as_u64().unwrap_or(0)
}

fn other_image_node(node: &str) -> &'static str {
    if node == "img-a" {
        "img-b"
    } else {
        "img-a"
    }
}

#[tokio::test]
async fn a_comfyui_restarted_empty_gets_the_prompt_again_once() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::standard(100);
    // Long enough that the node is back before its work would move.
    spec.node_grace_ms = 20_000;
    let mut harness = start(spec).await?;
    bounded(&mut harness, async |harness| {
        let id = harness.submit(&one_image()).await?;
        let (node, prompt) = still_running(harness, &id).await?;
        harness.kill_sim(&node).await?;
        harness.start_sim(&node).await?;
        expect_success(harness, &id).await?;
        let stats = harness.sim_stats(&node).await?;
        ensure!(
            stats["prompts_by_id"][&prompt] == 1,
            "{node} should have been sent {prompt} once after its restart: {stats}"
        );
        let other = harness.sim_stats(other_image_node(&node)).await?;
        ensure!(
            count(&other, "prompts_received") == 0,
            "work moved needlessly: {other}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn work_on_a_comfyui_that_never_returns_moves_to_another_image_node() -> anyhow::Result<()> {
    let mut harness = start(ClusterSpec::standard(100)).await?;
    bounded(&mut harness, async |harness| {
        let id = harness.submit(&one_image()).await?;
        let (node, _) = still_running(harness, &id).await?;
        harness.kill_sim(&node).await?;
        let run = expect_success(harness, &id).await?;
        let other = other_image_node(&node);
        ensure!(
            step(&run, "still")?["node"] == other,
            "the step did not move: {run}"
        );
        let stats = harness.sim_stats(other).await?;
        ensure!(count(&stats, "prompts_received") == 1, "{other}: {stats}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_socket_gone_silent_mid_run_does_not_stop_the_run() -> anyhow::Result<()> {
    let mut harness = start(ClusterSpec::standard(30)).await?;
    bounded(&mut harness, async |harness| {
        let id = harness.submit(&one_image()).await?;
        let (node, _) = still_running(harness, &id).await?;
        harness.sim_control(&node, &json!({"stall": true})).await?;
        expect_success(harness, &id).await?;
        let stats = harness.sim_stats(&node).await?;
        ensure!(count(&stats, "prompts_received") == 1, "{node}: {stats}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_dropped_socket_that_lost_the_completion_does_not_stop_the_run() -> anyhow::Result<()> {
    let mut harness = start(ClusterSpec::standard(30)).await?;
    bounded(&mut harness, async |harness| {
        for node in ["img-a", "img-b"] {
            harness
                .sim_control(node, &json!({"drop_socket_next": 1}))
                .await?;
        }
        let id = harness.submit(&one_image()).await?;
        let run = expect_success(harness, &id).await?;
        let node = step(&run, "still")?["node"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let stats = harness.sim_stats(&node).await?;
        ensure!(count(&stats, "prompts_received") == 1, "{node}: {stats}");
        ensure!(
            count(&stats, "ws_connections") >= 2,
            "the socket was not reopened: {stats}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn out_of_memory_is_retried_once_on_the_roomier_image_node() -> anyhow::Result<()> {
    // img-a (24 GiB) is picked first when both are idle; img-b has 48 GiB.
    let mut harness = start(ClusterSpec::standard(5)).await?;
    bounded(&mut harness, async |harness| {
        harness
            .sim_control("img-a", &json!({"oom_next": 1}))
            .await?;
        let id = harness.submit(&one_image()).await?;
        let run = expect_success(harness, &id).await?;
        ensure!(
            step(&run, "still")?["node"] == "img-b",
            "not retried on img-b: {run}"
        );
        for node in ["img-a", "img-b"] {
            let stats = harness.sim_stats(node).await?;
            ensure!(count(&stats, "prompts_received") == 1, "{node}: {stats}");
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn out_of_memory_on_both_nodes_fails_the_step_with_the_nodes_message() -> anyhow::Result<()> {
    let mut harness = start(ClusterSpec::standard(5)).await?;
    bounded(&mut harness, async |harness| {
        for node in ["img-a", "img-b"] {
            harness.sim_control(node, &json!({"oom_next": 1})).await?;
        }
        let id = harness.submit(&one_image()).await?;
        let run = harness.wait_end(&id, PATIENCE).await?;
        ensure!(run["state"] == "failed", "the run did not fail: {run}");
        let error = step(&run, "still")?["error"].to_string();
        ensure!(
            error.contains("out of memory"),
            "not the node's message: {error}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_node_whose_socket_upgrade_is_refused_gives_up_and_says_why() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::standard(5);
    if let Some(node) = spec.comfy_mut("img-b") {
        node.sim_args.push("--refuse-ws".into());
    }
    let mut harness = start(spec).await?;
    bounded(&mut harness, async |harness| {
        let reason = within("img-b to be given up", async {
            harness
                .wait_for("img-b's reason", PATIENCE, || async {
                    let nodes = harness.get("/api/nodes").await?;
                    let node = nodes["nodes"]
                        .as_array()
                        .and_then(|all| all.iter().find(|n| n["name"] == "img-b").cloned())
                        .unwrap_or_default();
                    let reason = node["reason"].as_str().unwrap_or_default().to_string();
                    let gave_up = node["available"] == false && reason.contains("gave up");
                    Ok(gave_up.then_some(reason))
                })
                .await
        })
        .await?;
        ensure!(
            reason.contains("refused"),
            "the reason does not name the refusal: {reason}"
        );
        let attempts = |stats: &Value| count(stats, "ws_refused") + count(stats, "ws_connections");
        let at_give_up = attempts(&harness.sim_stats("img-b").await?);
        ensure!(at_give_up <= 6, "{at_give_up} upgrade attempts");
        // The rest of the cluster works on, and img-b is left alone meanwhile.
        let id = harness.submit(&one_image()).await?;
        let run = expect_success(harness, &id).await?;
        ensure!(
            step(&run, "still")?["node"] == "img-a",
            "ran on a refused node: {run}"
        );
        let later = attempts(&harness.sim_stats("img-b").await?);
        ensure!(later <= 6, "{later} upgrade attempts after giving up");
        Ok(())
    })
    .await
}

/// Intent, still, and a clip of the still: the clip can run only on `vid`, the one video node.
fn still_then_clip() -> Value {
    json!({
        "name": "still then clip",
        "nodes": [
            {"id": "brief", "type": "intent", "data": {"prompt": "a lighthouse at dusk"}},
            {"id": "still", "type": "image",
             "data": {"width": 512, "height": 512, "steps": 4, "seed": 3}},
            {"id": "clip", "type": "video", "data": {"frames": 49, "fps": 16}}
        ],
        "edges": [
            {"id": "e1", "source": "brief", "target": "still"},
            {"id": "e2", "source": "still", "target": "clip"}
        ]
    })
}

/// What the daemon logs when it lets go of a task's pin to a node away past the grace.
const PIN_RELEASED: &str = "node away past the grace period; the task may go to any capable node";

#[tokio::test]
async fn the_only_video_node_back_after_the_grace_gets_its_step_again() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::standard(5);
    spec.node_grace_ms = 1_000;
    let mut harness = start(spec).await?;
    bounded(&mut harness, async |harness| {
        // Slow in its first life only, so the clip is caught running; restarted, the
        // simulator has its flags' pace again.
        harness.sim_control("vid", &json!({"step_ms": 200})).await?;
        let id = harness.submit(&still_then_clip()).await?;
        let run = harness
            .wait_run(&id, PATIENCE, |run| {
                let clip = multiplex::harness::step(run, "clip");
                clip["state"] == "running" && clip["remote"]["prompt_id"].is_string()
            })
            .await?;
        let prompt = step(&run, "clip")?["remote"]["prompt_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let first_life = harness.sim_stats("vid").await?;
        ensure!(
            first_life["prompts_by_id"][&prompt] == 1,
            "vid's first life: {first_life}"
        );

        harness.kill_sim("vid").await?;
        // The run retried the step, and the scheduler let go of its pin to vid: the very
        // state in which a task used to wait forever for a node it excluded.
        harness
            .wait_for(
                "the clip's pin to vid to be let go of",
                PATIENCE,
                || async {
                    let log = harness.log("daemon");
                    let released = log
                        .lines()
                        .any(|line| line.contains(PIN_RELEASED) && line.contains("node=vid"));
                    Ok(released.then_some(()))
                },
            )
            .await?;
        harness.start_sim("vid").await?;

        let run = expect_success(harness, &id).await?;
        ensure!(step(&run, "clip")?["node"] == "vid", "{run}");
        // Placed back on the node it left, the step first asked vid where its prompt stood.
        let resumed = harness.log("daemon").lines().any(|line| {
            line.contains("task placed")
                && line.contains(&format!("{id}/clip#2 node=vid"))
                && line.contains("resume=true")
        });
        ensure!(resumed, "the clip was not resumed on vid");
        // Restarted empty, vid did not know the prompt when asked: it got it again, once,
        // under the same id.
        let second_life = harness.sim_stats("vid").await?;
        ensure!(
            second_life["prompts_by_id"][&prompt] == 1
                && count(&second_life, "prompts_received") == 1,
            "vid's second life: {second_life}"
        );
        Ok(())
    })
    .await
}
