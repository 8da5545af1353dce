//! How many runs the store held at its last durable flush, kept in a file beside sled.
//!
//! sled recovers a damaged database by keeping what still reads well, silently: garbage
//! written over its file opens as an empty or shortened store. The manifest is the daemon's
//! own witness. It is written after each group flush, so it never claims more than is on
//! disk, and a store that opens with fewer runs than it says has lost some: the daemon
//! refuses to start on it rather than carry on as if those runs never existed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name inside the data directory.
pub const FILE_NAME: &str = "store-manifest.json";

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// Run records in the store at the last flush.
    pub runs: u64,
}

/// The manifest of the store in `data_dir`.
#[derive(Debug, Clone)]
pub struct ManifestFile {
    path: PathBuf,
}

impl ManifestFile {
    pub fn in_dir(data_dir: &Path) -> ManifestFile {
        ManifestFile {
            path: data_dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last manifest written, or `None` when there is none or it cannot be read (a torn
    /// write at a crash; the next flush writes it again).
    pub fn read(&self) -> Option<Manifest> {
        let bytes = std::fs::read(&self.path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(manifest) => Some(manifest),
            Err(err) => {
                tracing::warn!(path = %self.path.display(), error = %err,
                    "store manifest unreadable; checking nothing against it");
                None
            }
        }
    }

    /// Records `manifest`, through a temporary file so a reader never sees half of it. No
    /// fsync: a manifest lost at a crash only understates what the store holds.
    pub fn write(&self, manifest: &Manifest) -> std::io::Result<()> {
        let temporary = self.path.with_extension("json.tmp");
        let json = serde_json::to_vec(manifest).map_err(std::io::Error::other)?;
        std::fs::write(&temporary, json)?;
        std::fs::rename(&temporary, &self.path)
    }
}
