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

fn flush_loop(
    db: &sled::Db,
    queue: &mpsc::Receiver<oneshot::Sender<FlushResult>>,
    runs: &AtomicU64,
    manifest: &ManifestFile,
) {
    while let Ok(first) = queue.recv() {
        // Everyone queued by now wrote before this flush starts, so it covers them all; so
        // does the run count read here, which the manifest may therefore claim once durable.
        let mut group = vec![first];
        group.extend(queue.try_iter());
        let durable_runs = runs.load(Ordering::SeqCst);

        let result = db.flush().map(drop).map_err(|err| err.to_string());
        match &result {
            Ok(()) => {
                if let Err(err) = manifest.write(&Manifest { runs: durable_runs }) {
                    tracing::warn!(path = %manifest.path().display(), error = %err,
                        "cannot write the store manifest");
                }
            }
            Err(err) => {
                tracing::error!(error = %err, writers = group.len(), "store flush failed")
            }
        }
        for writer in group {
            let _ = writer.send(result.clone());
        }
    }
}
