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

/// Longest file name [`safe_filename`] keeps, in characters: well under the 255 bytes most
/// file systems allow, so a long step id still makes a name a download can be saved under.
pub const MAX_FILENAME_CHARS: usize = 120;

/// A file name that is safe to save under and to put in a header: path separators, control
/// characters and the invisible formatting marks that reorder or hide text (which step ids
/// and service answers may contain) become `_`, so the name can neither leave a folder,
/// break a `Content-Disposition` line, nor show another extension than it has (`U+202E`
/// makes `txt.exe` display as `exe.txt`); overlong names are cut, and a name that is empty
/// or all dots becomes `artifact`. Non-ASCII letters are kept.
pub fn safe_filename(name: &str) -> String {
    let mut safe: String = name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() || is_invisible_format(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    let chars = safe.chars().count();
    if chars > MAX_FILENAME_CHARS {
        // Keep the extension, which says how to open the file.
        let ext: String = match safe.rsplit_once('.') {
            Some((_, ext)) if ext.chars().count() <= 8 => format!(".{ext}"),
            _ => String::new(),
        };
        let keep = MAX_FILENAME_CHARS - ext.chars().count();
        safe = safe.chars().take(keep).collect::<String>() + &ext;
    }
    let trimmed = safe.trim();
    if trimmed.chars().all(|c| c == '.') {
        return "artifact".to_owned();
    }
    // A step id of blanks leaves only the extension: keep it visible, not a hidden file.
    if trimmed.starts_with('.') && !trimmed[1..].contains('.') {
        return format!("artifact{trimmed}");
    }
    trimmed.to_owned()
}

/// Bidirectional overrides and isolates, zero-width characters and the line and paragraph
/// separators: marks that change how a name reads without showing themselves.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}'
        | '\u{FEFF}')
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

#[cfg(test)]
mod tests {
    use super::safe_filename;

    #[test]
    fn file_names_cannot_leave_a_folder_or_break_a_header() {
        assert_eq!(
            safe_filename("../../../../tmp/pwned.txt"),
            ".._.._.._.._tmp_pwned.txt"
        );
        assert_eq!(safe_filename("x\r\ny.txt"), "x__y.txt");
        assert_eq!(safe_filename("a\\b\u{7f}.png"), "a_b_.png");
        assert_eq!(safe_filename("brief über.txt"), "brief über.txt");
        assert_eq!(safe_filename(".."), "artifact");
        assert_eq!(safe_filename("  "), "artifact");
        assert_eq!(safe_filename("  .txt"), "artifact.txt");
        assert_eq!(safe_filename("invoice\u{202E}txt.exe"), "invoice_txt.exe");
        assert_eq!(safe_filename("a\u{200B}b\u{2028}c.txt"), "a_b_c.txt");
        let long = format!("{}.txt", "é".repeat(500));
        let cut = safe_filename(&long);
        assert_eq!(cut.chars().count(), super::MAX_FILENAME_CHARS);
        assert!(cut.ends_with(".txt"), "{cut}");
    }
}
