//! Durability with real processes: the daemon and the simulators run as `multiplex`
//! children (see `multiplex::harness`) and are killed with SIGKILL at chosen moments.
//!
//! These guard against the failures an in-process restart cannot produce: a store closed
//! mid-write, prompts left queued on a ComfyUI that outlived the daemon, a ComfyUI that
//! forgot everything, sockets that go quiet or close without a word. After each, the run
//! must complete and no ComfyUI may have been asked twice for the same prompt.

mod daemon_kills;
mod minted_ids;
mod node_faults;

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use multiplex::harness::{ClusterSpec, Harness};
use serde_json::{json, Value};

/// Bound on one test's body; a hang fails the test with the processes' logs.
const TEST_BOUND: Duration = Duration::from_secs(90);
/// Bound on waiting for one run or one state.
const PATIENCE: Duration = Duration::from_secs(45);

/// Starts a cluster of child processes from the built binary.
async fn start(spec: ClusterSpec) -> anyhow::Result<Harness> {
    Harness::start(env!("CARGO_BIN_EXE_multiplex"), spec).await
}

/// Runs a test body within [`TEST_BOUND`]; on failure, prints the children's logs.
async fn bounded(
    harness: &mut Harness,
    body: impl AsyncFnOnce(&mut Harness) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let outcome = tokio::time::timeout(TEST_BOUND, body(harness)).await;
    let result = match outcome {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("the test took longer than {TEST_BOUND:?}")),
    };
    if result.is_err() {
        eprintln!("logs in {}:\n{}", harness.dir().display(), harness.logs());
    }
    result
}

/// Waits, up to [`PATIENCE`], for a future that polls on its own.
async fn within<T>(
    what: &str,
    future: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(PATIENCE, future)
        .await
        .with_context(|| format!("timed out waiting for {what}"))?
}

/// A workflow with a single image step (`still`), after an intent.
fn one_image() -> Value {
    json!({
        "name": "one image",
        "nodes": [
            {"id": "brief", "type": "intent", "data": {"prompt": "a lighthouse at dusk"}},
            {"id": "still", "type": "image",
             "data": {"width": 512, "height": 512, "steps": 20, "seed": 3}}
        ],
        "edges": [{"id": "e1", "source": "brief", "target": "still"}]
    })
}

/// One of the example workflows in `config/workflows`.
fn example(name: &str) -> anyhow::Result<Value> {
    let path = format!("{}/config/workflows/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))
}

/// Waits until the run ends and checks that it succeeded.
async fn expect_success(harness: &Harness, id: &str) -> anyhow::Result<Value> {
    let run = harness.wait_end(id, PATIENCE).await?;
    ensure!(
        run["state"] == "succeeded",
        "run {id} did not succeed: {run}"
    );
    Ok(run)
}

/// Every ComfyUI simulator ran each prompt id at most once, and they received `expected`
/// prompts in all.
async fn expect_exactly_once(harness: &Harness, expected: u64) -> anyhow::Result<()> {
    let mut received = 0;
    for name in harness.comfy_names() {
        let stats = harness.sim_stats(&name).await?;
        let duplicates = stats["duplicate_prompts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(
            duplicates.is_empty(),
            "{name} was asked twice for {duplicates:?}: {stats}"
        );
        received += stats["prompts_received"].as_u64().unwrap_or(0);
    }
    if received != expected {
        bail!("the ComfyUI simulators received {received} prompts, expected {expected}");
    }
    Ok(())
}

/// The step of a run view; an error naming the run when it has none.
fn step<'a>(run: &'a Value, id: &str) -> anyhow::Result<&'a Value> {
    let step = multiplex::harness::step(run, id);
    ensure!(!step.is_null(), "run has no step {id}: {run}");
    Ok(step)
}
