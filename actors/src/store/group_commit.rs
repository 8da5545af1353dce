//! Durable writes in groups: one thread flushes sled for every writer waiting at the time.
//!
//! sled 0.34's `flush_async` can leave concurrent waiters unwoken forever (its issues 1241
//! and 1308), which wedged every later transition once a few hundred runs were submitted
//! together. A synchronous `flush` on a thread of our own has no such race, keeps blocking
//! I/O off the async runtime, and commits in groups: while one flush runs, every writer that
//! arrives queues up, and the next flush answers them all at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::manifest::{Manifest, ManifestFile};

/// A flush that failed, as every writer of its group sees it (`sled::Error` is not `Clone`).
pub type FlushResult = Result<(), String>;

/// The flushing thread and the queue of writers waiting on it. Dropping it lets the thread
/// finish and waits for it, so the database is closed once the last handle is gone.
pub struct GroupCommit {
    requests: Option<mpsc::Sender<oneshot::Sender<FlushResult>>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the flushing thread; after each flush it records `runs` (the store's count of
    /// run records) in `manifest`.
    pub fn start(
        db: sled::Db,
        runs: Arc<AtomicU64>,
        manifest: ManifestFile,
    ) -> std::io::Result<GroupCommit> {
        let (requests, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-flush".into())
            .spawn(move || flush_loop(&db, &queue, &runs, &manifest))?;
        Ok(GroupCommit {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Resolves once everything written before the call is on disk.
    pub async fn flush(&self) -> FlushResult {
        let (done, wait) = oneshot::channel();
        let queued = self
            .requests
            .as_ref()
            .is_some_and(|requests| requests.send(done).is_ok());
        if !queued {
            return Err("the store's flush thread has stopped".into());
        }
        wait.await
            .unwrap_or_else(|_| Err("the store's flush thread stopped mid-flush".into()))
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        // Closing the queue ends the loop; joining makes sure the thread's handle on the
        // database is gone before whoever dropped the store opens it again.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Least time between two manifest writes. Each write creates a file and renames it over
/// the last one, which costs more than the flush itself when flushes come by the thousand;
/// a manifest that lags only claims fewer durable runs than there are, which the damage
/// check it serves tolerates.
const MANIFEST_EVERY: Duration = Duration::from_millis(200);

fn flush_loop(
    db: &sled::Db,
    queue: &mpsc::Receiver<oneshot::Sender<FlushResult>>,
    runs: &AtomicU64,
    manifest: &ManifestFile,
) {
    let mut recorded: Option<u64> = None;
    let mut unrecorded: Option<u64> = None;
    let mut last_write: Option<Instant> = None;
    while let Ok(first) = queue.recv() {
        // Everyone queued by now wrote before this flush starts, so it covers them all; so
        // does the run count read here, which the manifest may therefore claim once durable.
        let mut group = vec![first];
        group.extend(queue.try_iter());
        let durable_runs = runs.load(Ordering::SeqCst);

        let result = db.flush().map(drop).map_err(|err| err.to_string());
        if let Err(err) = &result {
            tracing::error!(error = %err, writers = group.len(), "store flush failed");
        }
        for writer in group {
            let _ = writer.send(result.clone());
        }

        if result.is_ok() && recorded != Some(durable_runs) {
            unrecorded = Some(durable_runs);
        }
        let due = last_write.is_none_or(|at| at.elapsed() >= MANIFEST_EVERY);
        if let (Some(count), true) = (unrecorded, due) {
            write_manifest(manifest, count);
            (recorded, unrecorded, last_write) = (Some(count), None, Some(Instant::now()));
        }
    }
    // The store is closing: record what the last flushes made durable.
    if let Some(count) = unrecorded {
        write_manifest(manifest, count);
    }
}

fn write_manifest(manifest: &ManifestFile, runs: u64) {
    if let Err(err) = manifest.write(&Manifest { runs }) {
        tracing::warn!(path = %manifest.path().display(), error = %err,
            "cannot write the store manifest");
    }
}
