//! How fast a daemon with a large history comes back: time from start to serving, and to
//! every unfinished run resumed and ended.
//!
//! `cargo bench --bench restart [-- RUNS]` (default 100 000). It writes RUNS finished runs,
//! each holding the example lighthouse document, plus 100 unfinished daemon-only runs
//! (`intent` -> `output`, still queued) straight into a store, then starts a daemon on that
//! data directory. The baseline is the same daemon on an empty store. docs/benchmarks.md
//! keeps the figures.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use multiplex::daemon::{DaemonOptions, DaemonThread};
use multiplex_actors::store::{RunRecord, RunState, StepRecord, StepState, Store};
use serde_json::{json, Value};
use time::OffsetDateTime;

const DEFAULT_RUNS: usize = 100_000;
/// Unfinished runs the restarted daemon resumes.
const UNFINISHED: usize = 100;
const PATIENCE: Duration = Duration::from_secs(300);

fn finished_run(document: &Value) -> RunRecord {
    let now = OffsetDateTime::now_utc();
    let steps = ["brief", "still", "clip", "voice", "negative", "deliver"]
        .iter()
        .map(|id| StepRecord {
            state: StepState::Succeeded,
            attempts: 1,
            finished_at: Some(now),
            ..StepRecord::new(id, "image")
        })
        .collect();
    RunRecord {
        id: uuid::Uuid::now_v7().to_string(),
        name: "lighthouse reel".into(),
        state: RunState::Succeeded,
        created_at: now,
        finished_at: Some(now),
        error: None,
        document: document.clone(),
        steps,
    }
}

fn unfinished_run() -> RunRecord {
    let document = json!({"name": "resume me", "nodes": [
            {"id": "brief", "type": "intent", "data": {"prompt": "a lighthouse at dusk"}},
            {"id": "deliver", "type": "output", "data": {}}],
        "edges": [{"id": "e", "source": "brief", "target": "deliver"}]});
    RunRecord {
        id: uuid::Uuid::now_v7().to_string(),
        name: "resume me".into(),
        state: RunState::Queued,
        created_at: OffsetDateTime::now_utc(),
        finished_at: None,
        error: None,
        document,
        steps: vec![
            StepRecord::new("brief", "intent"),
            StepRecord::new("deliver", "output"),
        ],
    }
}

/// Fills a store in `data_dir`; answers the unfinished runs' ids.
async fn fill(data_dir: &Path, runs: usize) -> Vec<String> {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/workflows/lighthouse.json"
    );
    let document: Value = serde_json::from_str(&std::fs::read_to_string(example).unwrap())
        .expect("the example workflow is JSON");
    let store = Store::open(data_dir).expect("the store opens");
    for _ in 0..runs {
        store
            .write_run(&finished_run(&document))
            .expect("a run is written");
    }
    let mut ids = Vec::new();
    for _ in 0..UNFINISHED {
        let run = unfinished_run();
        store.write_run(&run).expect("a run is written");
        ids.push(run.id);
    }
    store.flush().await.expect("the store flushes");
    ids
}

/// Starts a daemon on `data_dir`; answers the seconds until it listened and until every
/// run in `resumed` had succeeded.
async fn restart(data_dir: &Path, resumed: &[String]) -> (f64, f64) {
    let started = Instant::now();
    let daemon = DaemonThread::spawn(DaemonOptions {
        config: None,
        bind: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.to_path_buf()),
        ..DaemonOptions::default()
    })
    .expect("the daemon starts");
    let serving = started.elapsed().as_secs_f64();
    let http = reqwest::Client::new();
    for id in resumed {
        loop {
            let run: Value = http
                .get(format!("http://{}/api/workflows/{id}", daemon.addr))
                .send()
                .await
                .expect("GET a run")
                .json()
                .await
                .expect("the run is JSON");
            if run["state"] == "succeeded" {
                break;
            }
            assert_ne!(run["state"], "failed", "{run}");
            assert!(started.elapsed() < PATIENCE, "run {id} never ended: {run}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let reconciled = started.elapsed().as_secs_f64();
    daemon.stop().await;
    (serving, reconciled)
}

fn main() {
    let runs = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(DEFAULT_RUNS);
    actix_rt::System::new().block_on(async {
        let empty = tempfile::tempdir().expect("a temporary directory");
        let (empty_serving, _) = restart(empty.path(), &[]).await;

        let full = tempfile::tempdir().expect("a temporary directory");
        let filling = Instant::now();
        let resumed = fill(full.path(), runs).await;
        let filled = filling.elapsed().as_secs_f64();
        let (serving, reconciled) = restart(full.path(), &resumed).await;

        let report = format!(
            "store of {runs} finished runs + {UNFINISHED} unfinished (written in {filled:.1} s)\n\
             empty store:  serving after {empty_serving:>6.3} s\n\
             full store:   serving after {serving:>6.3} s, \
             {UNFINISHED} resumed runs ended after {reconciled:>6.3} s\n"
        );
        let _ = std::io::stdout().write_all(report.as_bytes());
    });
}
