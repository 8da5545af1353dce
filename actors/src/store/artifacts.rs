//! Content-addressed artifact files.
//!
//! Contents are streamed to a temporary file while being hashed, then renamed to a path
//! derived from the SHA-256, so a reader never sees a partial file and the same bytes are
//! stored once. Nothing here holds a whole artifact in memory.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::StoreError;
use crate::artifact::{safe_filename, ArtifactKind, ArtifactMeta};

/// The artifact directory and its sled index.
#[derive(Clone)]
pub struct ArtifactFiles {
    root: PathBuf,
    index: sled::Tree,
}

impl ArtifactFiles {
    pub(super) fn open(root: PathBuf, index: sled::Tree) -> Result<ArtifactFiles, StoreError> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|source| StoreError::File { path: tmp, source })?;
        Ok(ArtifactFiles { root, index })
    }

    /// Where the content of artifact `id` lives (whether or not it exists).
    pub fn path(&self, id: &str) -> PathBuf {
        let prefix = id.get(..2).unwrap_or("00");
        self.root.join(prefix).join(id)
    }

    /// Metadata of a stored artifact, if the id is known.
    pub fn get(&self, id: &str) -> Result<Option<ArtifactMeta>, StoreError> {
        // Ids are hex digests; refusing anything else keeps odd ids away from the file system.
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let value = self
            .index
            .get(id.as_bytes())
            .map_err(|source| StoreError::Db {
                what: format!("artifact {id}"),
                source,
            })?;
        value
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                    key: id.into(),
                    source,
                })
            })
            .transpose()
    }

    /// Stores a stream of bytes as an artifact and indexes it. The index write is flushed
    /// by the next durable run write, which is what makes the artifact reachable anyway.
    /// The file name is made safe ([`safe_filename`]); bytes already stored keep the
    /// metadata they were first indexed with.
    pub async fn put_stream<S, E>(
        &self,
        mut stream: S,
        filename: &str,
        kind: ArtifactKind,
        mime: &str,
    ) -> Result<ArtifactMeta, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tmp_path = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let file_error = |path: &Path, source| StoreError::File {
            path: path.into(),
            source,
        };
        let mut file = tokio::fs::File::create(&tmp_path)
            .await
            .map_err(|e| file_error(&tmp_path, e))?;

        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(err) => {
                    let _ = tokio::fs::remove_file(&tmp_path).await;
                    let source = std::io::Error::other(err.into());
                    return Err(file_error(&tmp_path, source));
                }
            };
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if let Err(err) = file.write_all(&chunk).await {
                let _ = tokio::fs::remove_file(&tmp_path).await;
                return Err(file_error(&tmp_path, err));
            }
        }
        file.sync_all()
            .await
            .map_err(|e| file_error(&tmp_path, e))?;
        drop(file);

        let id = hex::encode(hasher.finalize());
        let final_path = self.path(&id);
        if let Some(dir) = final_path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| file_error(dir, e))?;
        }
        tokio::fs::rename(&tmp_path, &final_path)
            .await
            .map_err(|e| file_error(&final_path, e))?;

        self.record(id, size, filename, kind, mime)
    }

    /// Stores bytes already in memory (small texts such as a narration).
    pub async fn put_bytes(
        &self,
        bytes: Bytes,
        filename: &str,
        kind: ArtifactKind,
        mime: &str,
    ) -> Result<ArtifactMeta, StoreError> {
        // Bytes already stored (the same prompt text in many runs) cost no file at all.
        let id = hex::encode(Sha256::digest(&bytes));
        let stored = tokio::fs::metadata(self.path(&id)).await;
        if stored.is_ok_and(|file| file.len() == bytes.len() as u64) {
            return self.record(id, bytes.len() as u64, filename, kind, mime);
        }
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes)]);
        self.put_stream(stream, filename, kind, mime).await
    }

    /// Indexes stored bytes under their id and answers the caller's metadata for them.
    fn record(
        &self,
        id: String,
        size: u64,
        filename: &str,
        kind: ArtifactKind,
        mime: &str,
    ) -> Result<ArtifactMeta, StoreError> {
        let meta = ArtifactMeta {
            id: id.clone(),
            kind,
            mime: mime.to_string(),
            size,
            filename: safe_filename(filename),
        };
        let json = serde_json::to_vec(&meta).map_err(|source| StoreError::Corrupt {
            key: id.clone(),
            source,
        })?;
        // Only the first store of these bytes writes the index: another run producing the
        // same content (two intents with one prompt) must not rename or re-type the file the
        // first run's links serve. The caller still gets its own name and kind for its record.
        self.index
            .compare_and_swap(id.as_bytes(), None::<&[u8]>, Some(json))
            .map_err(|source| StoreError::Db {
                what: format!("artifact {id}"),
                source,
            })?
            .ok();
        Ok(meta)
    }
}
