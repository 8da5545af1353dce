//! What must survive a restart: runs with their steps in sled, artifacts as files.
//!
//! Layout under the data directory:
//!
//! - `db/`: the sled database. Tree `runs` maps a run id (a UUIDv7, so keys sort by creation
//!   time) to the JSON of its [`RunRecord`]; tree `unfinished` holds the ids of runs last
//!   written in a state that is not final, so a restart resumes them without reading every
//!   run ever stored; tree `artifacts` maps an artifact id to the JSON of its
//!   [`ArtifactMeta`](crate::artifact::ArtifactMeta).
//! - `artifacts/xx/<sha256>`: artifact contents, named by their hash (`xx` is its first two
//!   hex digits), written through `artifacts/tmp/` and renamed into place once complete.
//! - `store-manifest.json`: how many runs were durable at a recent flush ([`manifest`]); a
//!   store that opens with fewer has been damaged, and opening it fails.
//!
//! Every write that records a transition is flushed before the caller goes on, so what the
//! daemon acknowledged or sent to a node is on disk first. Flushes are shared by every
//! writer waiting at the time ([`group_commit`]), which keeps many small durable writes cheap.
//!
//! A record that cannot be decoded (a damaged disk, a bug in an older version) is logged and
//! left out of listings and resumes, so one bad record never hides or stops the others.

mod artifacts;
mod group_commit;
mod manifest;
mod records;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use group_commit::GroupCommit;
use manifest::ManifestFile;

pub use artifacts::ArtifactFiles;
pub use records::{RemoteRef, RunRecord, RunState, StepError, StepRecord, StepState};

/// Errors of the store, each naming what it was doing and on which path or record.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the store at {path}: {source}. If another multiplex daemon uses this data \
         directory, stop it first; if the store is damaged, move the directory aside and start \
         again (nothing is deleted automatically)"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store I/O on {what}: {source}")]
    Db { what: String, source: sled::Error },
    #[error("store flush: {0}")]
    Flush(String),
    #[error(
        "the store at {path} holds {found} runs, but {recorded} were durable at its last \
         flush ({manifest}): it looks damaged, and the daemon does not start on a store that \
         lost runs. Move the data directory aside and restore it from a backup, or delete \
         the manifest file to accept what is left"
    )]
    Damaged {
        path: PathBuf,
        manifest: PathBuf,
        found: u64,
        recorded: u64,
    },
    #[error("stored record {key} cannot be read: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("artifact file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Handle to the store; cheap to clone and shared by every actor that persists.
#[derive(Clone)]
pub struct Store {
    runs: sled::Tree,
    /// Ids of the runs in `runs` whose stored state is not final (values are empty).
    unfinished: sled::Tree,
    /// Run records in `runs`, kept by [`Store::write_run`] for the manifest.
    run_count: Arc<AtomicU64>,
    files: ArtifactFiles,
    commits: Arc<GroupCommit>,
}

impl Store {
    /// Opens (or creates) the store in `data_dir`. Never wipes anything it cannot read.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let db_path = data_dir.join("db");
        let open_error = |source| StoreError::Open {
            path: db_path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let db = open_db(&db_path).map_err(open_error)?;
        // A store written before the index existed gets it built once, from every run.
        let indexed = db
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == UNFINISHED_TREE.as_bytes());
        let runs = db.open_tree("runs").map_err(open_error)?;
        let unfinished = db.open_tree(UNFINISHED_TREE).map_err(open_error)?;
        if !indexed {
            index_unfinished(&runs, &unfinished).map_err(open_error)?;
        }

        let manifest = ManifestFile::in_dir(data_dir);
        let found = runs.len() as u64;
        if let Some(recorded) = manifest.read().map(|m| m.runs).filter(|&n| n > found) {
            return Err(StoreError::Damaged {
                path: db_path.clone(),
                manifest: manifest.path().to_path_buf(),
                found,
                recorded,
            });
        }
        let run_count = Arc::new(AtomicU64::new(found));

        let artifact_index = db.open_tree("artifacts").map_err(open_error)?;
        let files = ArtifactFiles::open(data_dir.join("artifacts"), artifact_index)?;
        let commits = GroupCommit::start(db, run_count.clone(), manifest)
            .map_err(|err| open_error(sled::Error::Io(err)))?;
        Ok(Store {
            runs,
            unfinished,
            run_count,
            files,
            commits: Arc::new(commits),
        })
    }

    /// The artifact files and their index.
    pub fn artifacts(&self) -> &ArtifactFiles {
        &self.files
    }

    /// Writes a run record and waits until it is durable.
    pub async fn save_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.write_run(run)?;
        self.flush().await
    }

    /// Writes a run record without waiting for durability: for progress that may be lost.
    pub fn write_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(run).map_err(|source| StoreError::Corrupt {
            key: run.id.clone(),
            source,
        })?;
        let db_error = |source| StoreError::Db {
            what: format!("run {}", run.id),
            source,
        };
        // The index may name a run that has ended (resume reads the record and skips it),
        // never miss one that has not: an unfinished run is indexed before it is written,
        // and leaves the index only after its final state is.
        let finished = run.state.is_terminal();
        if !finished {
            self.unfinished
                .insert(run.id.as_bytes(), &[])
                .map_err(db_error)?;
        }
        let previous = self
            .runs
            .insert(run.id.as_bytes(), json)
            .map_err(db_error)?;
        if finished {
            self.unfinished
                .remove(run.id.as_bytes())
                .map_err(db_error)?;
        }
        if previous.is_none() {
            self.run_count.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Waits until everything written so far is on disk. Concurrent callers share flushes.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.commits.flush().await.map_err(StoreError::Flush)
    }

    pub fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let value = self
            .runs
            .get(id.as_bytes())
            .map_err(|source| StoreError::Db {
                what: format!("run {id}"),
                source,
            })?;
        value.map(|bytes| decode_run(id, &bytes)).transpose()
    }

    /// Runs newest first, at most `limit`, optionally only those older than `before` (an id).
    pub fn list_runs(
        &self,
        limit: usize,
        before: Option<&str>,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let range = match before {
            Some(id) => self.runs.range(..id.as_bytes().to_vec()),
            None => self.runs.range::<Vec<u8>, _>(..),
        };
        let mut runs = Vec::new();
        for entry in range.rev() {
            if runs.len() == limit {
                break;
            }
            let (key, value) = entry.map_err(|source| StoreError::Db {
                what: "run listing".into(),
                source,
            })?;
            // A record left out does not count against the page.
            runs.extend(decode_or_skip(&key, &value));
        }
        Ok(runs)
    }

    /// Runs that had not finished when they were last written: the ones to resume.
    pub fn unfinished_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let db_error = |source| StoreError::Db {
            what: "unfinished runs".into(),
            source,
        };
        let mut runs = Vec::new();
        for entry in self.unfinished.iter() {
            let (key, _) = entry.map_err(db_error)?;
            let Some(value) = self.runs.get(&key).map_err(db_error)? else {
                continue;
            };
            let run = decode_or_skip(&key, &value);
            runs.extend(run.filter(|run| !run.state.is_terminal()));
        }
        Ok(runs)
    }
}

/// Opens sled, waiting up to [`LOCK_PATIENCE`] for its file lock: sled's own threads let go
/// of it a moment after the last handle of a store that was just closed (a daemon started
/// again at once, a test reopening its store) is dropped. A lock still held after that
/// belongs to another process.
fn open_db(db_path: &Path) -> sled::Result<sled::Db> {
    let config = sled::Config::new().path(db_path).flush_every_ms(Some(200));
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match config.open() {
            // sled wraps the lock's WouldBlock in an error of its own words.
            Err(sled::Error::Io(err))
                if (err.kind() == std::io::ErrorKind::WouldBlock
                    || err.to_string().contains("could not acquire lock"))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// How long opening waits for a lock held by a store closing in this process.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Name of the tree of unfinished run ids.
const UNFINISHED_TREE: &str = "unfinished";

/// Fills the `unfinished` index from every stored run (once, for a store older than it).
/// A record that cannot be read is indexed: resume then logs it rather than forgetting it.
fn index_unfinished(runs: &sled::Tree, unfinished: &sled::Tree) -> sled::Result<()> {
    #[derive(serde::Deserialize)]
    struct StateOnly {
        state: RunState,
    }
    for entry in runs.iter() {
        let (key, value) = entry?;
        let state = serde_json::from_slice::<StateOnly>(&value).map(|run| run.state);
        if !state.is_ok_and(RunState::is_terminal) {
            unfinished.insert(key, &[])?;
        }
    }
    unfinished.flush()?;
    Ok(())
}

/// A listed record, or `None` (logged) when it cannot be read.
fn decode_or_skip(key: &[u8], bytes: &[u8]) -> Option<RunRecord> {
    let key = String::from_utf8_lossy(key);
    match decode_run(&key, bytes) {
        Ok(run) => Some(run),
        Err(err) => {
            tracing::error!(run = %key, error = %err, "skipping a stored run that cannot be read");
            None
        }
    }
}

fn decode_run(key: &str, bytes: &[u8]) -> Result<RunRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.into(),
        source,
    })
}
