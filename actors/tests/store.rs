//! The store under concurrent durable writes, and reading back what a crash left.
//!
//! Guards against a deadlock of sled 0.34 when several flushes run at once: hundreds of
//! runs submitted together used to wedge every later write.

use multiplex_actors::store::{RunRecord, RunState, Store};

fn record(id: &str) -> RunRecord {
    RunRecord {
        id: id.to_string(),
        name: "concurrent".into(),
        state: RunState::Queued,
        created_at: time::OffsetDateTime::now_utc(),
        finished_at: None,
        error: None,
        document: serde_json::json!({"nodes": [], "edges": []}),
        steps: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn hundreds_of_concurrent_durable_writes_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let writers: Vec<_> = (0..400)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.save_run(&record(&format!("run-{i:04}"))).await })
        })
        .collect();
    let all = futures_util::future::join_all(writers);
    let results = tokio::time::timeout(std::time::Duration::from_secs(60), all)
        .await
        .expect("concurrent flushes finish instead of deadlocking");
    for result in results {
        result.unwrap().unwrap();
    }
    assert_eq!(store.list_runs(1000, None).unwrap().len(), 400);
}

#[tokio::test]
async fn a_damaged_record_is_left_out_instead_of_failing_listing_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.save_run(&record("good")).await.unwrap();
    }
    {
        // Write garbage under a run key, as a bug or a damaged disk might.
        let db = sled::open(dir.path().join("db")).unwrap();
        db.open_tree("runs")
            .unwrap()
            .insert("bad", b"{not json".to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let listed = store.list_runs(10, None).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "good");
    assert_eq!(store.unfinished_runs().unwrap().len(), 1);
}
