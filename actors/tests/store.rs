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

/// Resume reads only the runs that have not ended, through an index that follows every
/// write; a store written before the index existed gets it built when opened.
#[tokio::test]
async fn unfinished_runs_come_from_an_index_built_once_for_older_stores() {
    let dir = tempfile::tempdir().unwrap();
    {
        // An older store: runs, and no index.
        let db = sled::open(dir.path().join("db")).unwrap();
        let runs = db.open_tree("runs").unwrap();
        let finished = RunRecord {
            state: RunState::Succeeded,
            ..record("old-finished")
        };
        for run in [record("old-queued"), finished] {
            runs.insert(run.id.as_bytes(), serde_json::to_vec(&run).unwrap())
                .unwrap();
        }
        db.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let ids = |store: &Store| -> Vec<String> {
        store
            .unfinished_runs()
            .unwrap()
            .into_iter()
            .map(|run| run.id)
            .collect()
    };
    assert_eq!(ids(&store), ["old-queued"]);

    store.save_run(&record("new-queued")).await.unwrap();
    let ended = RunRecord {
        state: RunState::Cancelled,
        ..record("old-queued")
    };
    store.save_run(&ended).await.unwrap();
    assert_eq!(ids(&store), ["new-queued"]);
    drop(store);
    assert_eq!(ids(&Store::open(dir.path()).unwrap()), ["new-queued"]);
}

/// Opening must fail with an error that names the database path, never panic or wipe.
fn open_error(data_dir: &std::path::Path) -> String {
    match std::panic::catch_unwind(|| Store::open(data_dir)) {
        Ok(Ok(_)) => panic!("a damaged store at {} opened", data_dir.display()),
        Ok(Err(err)) => err.to_string(),
        Err(_) => panic!("opening a damaged store at {} panicked", data_dir.display()),
    }
}

#[test]
fn a_data_directory_that_is_a_file_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let message = open_error(&file);
    assert!(
        message.starts_with(&format!(
            "cannot create the data directory {}",
            file.display()
        )),
        "{message}"
    );
}

#[tokio::test]
async fn a_store_that_cannot_be_opened_is_an_error_naming_its_path() {
    // In use by another daemon: sled's lock file is held.
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap();
    let message = open_error(dir.path());
    assert!(
        message.contains(&dir.path().join("db").display().to_string()),
        "{message}"
    );
    assert!(message.contains("another multiplex daemon"), "{message}");
    drop(first);

    // The database's files overwritten with garbage, as a bad disk might leave them.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.save_run(&record("kept")).await.unwrap();
    }
    let db = dir.path().join("db");
    for entry in std::fs::read_dir(&db).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::write(&path, vec![0xA5; 4096]).unwrap();
        }
    }
    let message = open_error(dir.path());
    assert!(message.contains(&db.display().to_string()), "{message}");
    // Nothing was deleted to make room for a fresh store.
    assert!(std::fs::read_dir(&db).unwrap().count() > 0);

    // A data directory that is a file.
    let file = tempfile::NamedTempFile::new().unwrap();
    let message = open_error(file.path());
    assert!(
        message.contains(&file.path().display().to_string()),
        "{message}"
    );
}

#[tokio::test]
async fn a_store_that_lost_runs_to_damage_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        for i in 0..10 {
            store.save_run(&record(&format!("run-{i}"))).await.unwrap();
        }
    }
    // sled opens a database whose head was overwritten as an empty one, without a word.
    let db_file = dir.path().join("db").join("db");
    let mut bytes = std::fs::read(&db_file).unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let head = garbage.len().min(bytes.len());
    bytes[..head].copy_from_slice(&garbage[..head]);
    std::fs::write(&db_file, bytes).unwrap();

    let message = open_error(dir.path());
    assert!(
        message.contains("looks damaged") && message.contains("10 were durable"),
        "{message}"
    );
    assert!(
        message.contains(&dir.path().join("db").display().to_string()),
        "{message}"
    );
}

#[tokio::test]
async fn a_sound_store_reopens_with_every_run_after_many_restarts() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list_runs(100, None).unwrap().len(), round * 4);
        for i in 0..4 {
            store
                .save_run(&record(&format!("run-{round}-{i}")))
                .await
                .unwrap();
        }
        // Rewriting a run does not count it twice.
        store
            .save_run(&record(&format!("run-{round}-0")))
            .await
            .unwrap();
    }
}

/// Artifacts are content-addressed: a second store of the same bytes (another run's intent
/// with the same prompt) used to overwrite the first one's name and type, so the first
/// run's link served the second run's file name, even one a header cannot carry.
#[tokio::test]
async fn the_first_metadata_of_some_bytes_is_kept() {
    use multiplex_actors::artifact::ArtifactKind;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let files = store.artifacts();
    let bytes = bytes::Bytes::from_static(b"a lighthouse at dusk");
    let text = "text/plain; charset=utf-8";
    let first = files
        .put_bytes(bytes.clone(), "brief.txt", ArtifactKind::Text, text)
        .await
        .unwrap();
    let second = files
        .put_bytes(
            bytes,
            "x\r\ny.bin",
            ArtifactKind::Data,
            "application/octet-stream",
        )
        .await
        .unwrap();
    assert_eq!(first.id, second.id);
    // The caller's record keeps its own kind, under a name made safe.
    assert_eq!(second.kind, ArtifactKind::Data);
    assert_eq!(second.filename, "x__y.bin");
    let indexed = files.get(&first.id).unwrap().unwrap();
    assert_eq!(indexed, first);
}
