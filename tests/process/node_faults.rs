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
