//! `kill -9` of the daemon at four points of a run, then a restart on the same data
//! directory: the run completes, and no prompt reaches a ComfyUI twice.
//!
//! The lighthouse workflow has three ComfyUI steps (`still`, `clip`, `negative`) and one
//! LangFlow step; its image steps are slowed so that each point can be caught.

use multiplex::harness::{ClusterSpec, Harness};

use crate::{bounded, example, expect_exactly_once, expect_success, start, PATIENCE};

/// ComfyUI steps of `lighthouse.json`.
const LIGHTHOUSE_COMFY_STEPS: u64 = 3;

/// Restarts the daemon and checks that the runs complete exactly once.
async fn restart_and_check(
    harness: &mut Harness,
    runs: &[String],
    steps: u64,
) -> anyhow::Result<()> {
    harness.kill_daemon().await?;
    harness.start_daemon().await?;
    for id in runs {
        expect_success(harness, id).await?;
    }
    expect_exactly_once(harness, steps).await
}

#[tokio::test]
async fn killed_just_after_the_submission_was_answered() -> anyhow::Result<()> {
    let mut harness = start(ClusterSpec::standard(20)).await?;
    bounded(&mut harness, async |harness| {
        let id = harness.submit(&example("lighthouse.json")?).await?;
        restart_and_check(harness, &[id], LIGHTHOUSE_COMFY_STEPS).await
    })
    .await
}

#[tokio::test]
async fn killed_while_a_step_waits_for_a_node() -> anyhow::Result<()> {
    // Two runs of two image steps each on two image nodes of one slot: some step queues.
    let mut harness = start(ClusterSpec::standard(40)).await?;
    bounded(&mut harness, async |harness| {
        let workflow = example("two-branches.json")?;
        let first = harness.submit(&workflow).await?;
        let second = harness.submit(&workflow).await?;
        harness
            .wait_run(&second, PATIENCE, |run| {
                run["steps"]
                    .as_array()
                    .is_some_and(|steps| steps.iter().any(|s| s["state"] == "queued"))
            })
            .await?;
        restart_and_check(harness, &[first, second], 4).await
    })
    .await
}

#[tokio::test]
async fn killed_while_a_step_runs() -> anyhow::Result<()> {
    let mut harness = start(ClusterSpec::standard(60)).await?;
    bounded(&mut harness, async |harness| {
        let id = harness.submit(&example("lighthouse.json")?).await?;
        harness
            .wait_run(&id, PATIENCE, |run| {
                multiplex::harness::step(run, "still")["state"] == "running"
            })
            .await?;
        restart_and_check(harness, &[id], LIGHTHOUSE_COMFY_STEPS).await
    })
    .await
}

#[tokio::test]
async fn killed_between_two_steps() -> anyhow::Result<()> {
    let mut harness = start(ClusterSpec::standard(20)).await?;
    bounded(&mut harness, async |harness| {
        let id = harness.submit(&example("lighthouse.json")?).await?;
        // The still done, the video step that follows it not yet.
        harness
            .wait_run(&id, PATIENCE, |run| {
                let done = |id| multiplex::harness::step(run, id)["state"] == "succeeded";
                done("still") && !done("clip")
            })
            .await?;
        restart_and_check(harness, &[id], LIGHTHOUSE_COMFY_STEPS).await
    })
    .await
}
