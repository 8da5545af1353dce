//! ComfyUIs that ignore our prompt id and mint their own, as servers before client-chosen
//! ids did (`--mint-prompt-ids`): a run completes, a daemon killed mid-step and restarted
//! finishes the step with the one prompt it posted, and a cancel interrupts the prompt the
//! server runs for us, by the server's id.

use anyhow::ensure;
use multiplex::harness::{ClusterSpec, Harness};
use serde_json::Value;

use crate::{bounded, example, expect_exactly_once, expect_success, one_image, start, step};
use crate::{within, PATIENCE};

/// The standard cluster with every ComfyUI minting its own prompt ids.
fn minting(image_step_ms: u64) -> ClusterSpec {
    let mut spec = ClusterSpec::standard(image_step_ms);
    for node in &mut spec.comfyui {
        node.sim_args.push("--mint-prompt-ids".into());
    }
    spec
}

/// Our id and the server's for a step; an error when the server's was not recorded.
fn ids(run: &Value, step_id: &str) -> anyhow::Result<(String, String)> {
    let remote = &step(run, step_id)?["remote"];
    let (ours, server) = (&remote["prompt_id"], &remote["server_prompt_id"]);
    ensure!(
        ours.is_string() && server.is_string() && ours != server,
        "step {step_id} has not recorded the server's own prompt id: {remote}"
    );
    Ok((
        ours.as_str().unwrap_or_default().into(),
        server.as_str().unwrap_or_default().into(),
    ))
}

/// Waits until `step_id` runs with the server's id recorded.
async fn running_with_server_id(
    harness: &Harness,
    id: &str,
    step_id: &str,
) -> anyhow::Result<Value> {
    harness
        .wait_run(id, PATIENCE, |run| {
            let step = multiplex::harness::step(run, step_id);
            step["state"] == "running" && step["remote"]["server_prompt_id"].is_string()
        })
        .await
}

#[tokio::test]
async fn a_run_completes_on_comfyuis_that_mint_their_own_prompt_ids() -> anyhow::Result<()> {
    let mut harness = start(minting(20)).await?;
    bounded(&mut harness, async |harness| {
        let id = harness.submit(&example("lighthouse.json")?).await?;
        let run = expect_success(harness, &id).await?;
        for step_id in ["still", "clip", "negative"] {
            ids(&run, step_id)?;
        }
        expect_exactly_once(harness, 3).await
    })
    .await
}

#[tokio::test]
async fn a_daemon_killed_mid_step_on_a_minting_comfyui_posts_the_prompt_once() -> anyhow::Result<()>
{
    let mut harness = start(minting(60)).await?;
    bounded(&mut harness, async |harness| {
        let id = harness.submit(&one_image()).await?;
        let run = running_with_server_id(harness, &id, "still").await?;
        let (ours, server) = ids(&run, "still")?;
        let node = step(&run, "still")?["node"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        harness.kill_daemon().await?;
        harness.start_daemon().await?;
        let run = expect_success(harness, &id).await?;
        ensure!(
            ids(&run, "still")? == (ours.clone(), server),
            "the step is still known by the same ids: {run}"
        );
        let stats = harness.sim_stats(&node).await?;
        ensure!(
            stats["prompts_received"] == 1 && stats["prompts_by_id"][&ours] == 1,
            "{node} should have received the prompt once: {stats}"
        );
        expect_exactly_once(harness, 1).await
    })
    .await
}

#[tokio::test]
async fn cancelling_on_a_minting_comfyui_interrupts_the_running_prompt() -> anyhow::Result<()> {
    // Slow enough that the step is still sampling when the cancel lands.
    let mut harness = start(minting(200)).await?;
    bounded(&mut harness, async |harness| {
        let id = harness.submit(&one_image()).await?;
        let run = running_with_server_id(harness, &id, "still").await?;
        let (_, server) = ids(&run, "still")?;
        let node = step(&run, "still")?["node"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (status, answer) = harness
            .post(&format!("/api/workflows/{id}/cancel"), &Value::Null)
            .await?;
        ensure!(status == 200, "cancel answered {status}: {answer}");
        let stats = within("the prompt to end interrupted", async {
            loop {
                let stats = harness.sim_stats(&node).await?;
                if stats["interrupted_prompts"]
                    .as_array()
                    .is_some_and(|ids| !ids.is_empty())
                {
                    return Ok(stats);
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await?;
        ensure!(
            stats["interrupted_prompts"] == serde_json::json!([server]),
            "{node} should have interrupted {server} only: {stats}"
        );
        ensure!(
            stats["interrupts_received"] == 1 && stats["queue_remaining"] == 0,
            "one interrupt, nothing left queued: {stats}"
        );
        let run = harness.wait_end(&id, PATIENCE).await?;
        ensure!(run["state"] == "cancelled", "run not cancelled: {run}");
        Ok(())
    })
    .await
}
