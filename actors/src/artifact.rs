//! What steps produce and consume: typed, content-addressed files.

use serde::{Deserialize, Serialize};

/// The kind of data an artifact holds; step inputs are typed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    Text,
    Image,
    Video,
    Data,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Text => "text",
            ArtifactKind::Image => "image",
            ArtifactKind::Video => "video",
            ArtifactKind::Data => "data",
        }
    }
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Metadata of a stored artifact. The id is the hex SHA-256 of the content, so the same bytes
/// produced twice are stored once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    pub id: String,
    pub kind: ArtifactKind,
    /// MIME type served with the content, e.g. `image/png`.
    pub mime: String,
    pub size: u64,
    /// The name the producing service gave the file (for downloads and for display).
    pub filename: String,
}

impl ArtifactMeta {
    /// The REST path where the artifact's content is served.
    pub fn link(&self) -> String {
        format!("/api/artifacts/{}", self.id)
    }
}

/// Guesses the MIME type and artifact kind from a file name's extension.
pub fn classify_filename(filename: &str) -> (ArtifactKind, &'static str) {
    let ext = filename
        .rsplit('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "png" => (ArtifactKind::Image, "image/png"),
        "jpg" | "jpeg" => (ArtifactKind::Image, "image/jpeg"),
        "webp" => (ArtifactKind::Image, "image/webp"),
        "gif" => (ArtifactKind::Video, "image/gif"),
        "mp4" => (ArtifactKind::Video, "video/mp4"),
        "webm" => (ArtifactKind::Video, "video/webm"),
        "txt" => (ArtifactKind::Text, "text/plain; charset=utf-8"),
        "json" => (ArtifactKind::Data, "application/json"),
        _ => (ArtifactKind::Data, "application/octet-stream"),
    }
}
