//! ComfyUI's WebSocket messages, parsed without any I/O.
//!
//! Text frames are JSON `{type, data}`; binary frames start with a big-endian u32 event type and
//! are never JSON. Parsing is total: anything unexpected becomes [`ComfyEvent::Unknown`], because
//! one odd frame from a server must never take down the socket that every job on the node shares.

use bytes::Bytes;
use serde_json::Value;

/// Binary event type 1: a preview image, then a u32 format (1 JPEG, 2 PNG), then the image.
const BINARY_PREVIEW_IMAGE: u32 = 1;
/// Binary event type 3: progress text, `u32 node id length + node id + text`.
const BINARY_TEXT: u32 = 3;
/// Binary event type 4: a preview with a JSON header (`u32 length + JSON + image`), sent to
/// clients that announced `supports_preview_metadata`.
const BINARY_PREVIEW_WITH_METADATA: u32 = 4;

/// One event of a ComfyUI socket. Cheap to clone (images are shared [`Bytes`]), so a node can
/// fan every event out to the jobs it runs through a broadcast channel.
#[derive(Debug, Clone, PartialEq)]
pub enum ComfyEvent {
    /// Queue length; the first one after connecting also carries the session id.
    Status {
        queue_remaining: Option<u64>,
        sid: Option<String>,
    },
    ExecutionStart {
        prompt_id: String,
    },
    /// Nodes whose cached result is reused (ComfyUI may list nulls; they are dropped).
    ExecutionCached {
        prompt_id: String,
        nodes: Vec<String>,
    },
    /// A node starts; `node: None` means the prompt is done. After a reconnect ComfyUI resends
    /// the current node without a prompt id.
    Executing {
        node: Option<String>,
        prompt_id: Option<String>,
    },
    /// Step progress of one node (sampler steps, frames...).
    Progress {
        prompt_id: Option<String>,
        node: Option<String>,
        value: f64,
        max: f64,
    },
    /// Per-node progress map of newer servers, kept raw.
    ProgressState {
        prompt_id: Option<String>,
        raw: Value,
    },
    /// A node produced UI output (`{images: [...]}` and the like).
    Executed {
        prompt_id: Option<String>,
        node: String,
        output: Value,
    },
    ExecutionSuccess {
        prompt_id: String,
    },
    ExecutionError(ExecutionErrorEvent),
    ExecutionInterrupted {
        prompt_id: String,
        node_id: Option<String>,
        node_type: Option<String>,
    },
    /// A preview image from a binary frame. Type 1 frames say nothing about the prompt; type 4
    /// frames name the prompt and node.
    Preview(Preview),
    /// Progress text from a binary type 3 frame.
    Text {
        node_id: Option<String>,
        text: String,
    },
    /// Any other message type (including `feature_flags`), or a frame that could not be read.
    Unknown {
        kind: String,
    },
}

/// The fields of an `execution_error` event (also found in history status messages).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExecutionErrorEvent {
    pub prompt_id: String,
    pub node_id: Option<String>,
    pub node_type: Option<String>,
    pub exception_type: Option<String>,
    pub exception_message: String,
    pub traceback: Vec<String>,
}

/// A preview image pushed over the socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// `image/jpeg` or `image/png` (or what a type 4 header names).
    pub mime: String,
    pub image: Bytes,
    pub prompt_id: Option<String>,
    pub node_id: Option<String>,
}

impl ComfyEvent {
    /// The prompt this event names, if it names one.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            ComfyEvent::ExecutionStart { prompt_id }
            | ComfyEvent::ExecutionCached { prompt_id, .. }
            | ComfyEvent::ExecutionSuccess { prompt_id }
            | ComfyEvent::ExecutionInterrupted { prompt_id, .. } => Some(prompt_id),
            ComfyEvent::ExecutionError(err) => Some(&err.prompt_id),
            ComfyEvent::Executing { prompt_id, .. }
            | ComfyEvent::Progress { prompt_id, .. }
            | ComfyEvent::ProgressState { prompt_id, .. }
            | ComfyEvent::Executed { prompt_id, .. } => prompt_id.as_deref(),
            ComfyEvent::Preview(preview) => preview.prompt_id.as_deref(),
            ComfyEvent::Status { .. } | ComfyEvent::Text { .. } | ComfyEvent::Unknown { .. } => {
                None
            }
        }
    }
}

/// Parses a text frame.
pub fn parse_text(text: &str) -> ComfyEvent {
    let Ok(message) = serde_json::from_str::<Value>(text) else {
        return unknown("malformed-json");
    };
    let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
    let data = message.get("data").cloned().unwrap_or(Value::Null);
    parse_message(kind, &data)
}

/// Parses one `{type, data}` message (a text frame, or an entry of a history status).
pub fn parse_message(kind: &str, data: &Value) -> ComfyEvent {
    let prompt_id = || str_field(data, "prompt_id");
    let required_prompt_id = || prompt_id().unwrap_or_default();
    match kind {
        "status" => ComfyEvent::Status {
            queue_remaining: data
                .pointer("/status/exec_info/queue_remaining")
                .and_then(as_u64),
            sid: str_field(data, "sid"),
        },
        "execution_start" => ComfyEvent::ExecutionStart {
            prompt_id: required_prompt_id(),
        },
        "execution_cached" => ComfyEvent::ExecutionCached {
            prompt_id: required_prompt_id(),
            nodes: data
                .get("nodes")
                .and_then(Value::as_array)
                .map(|nodes| nodes.iter().filter_map(node_id).collect())
                .unwrap_or_default(),
        },
        "executing" => ComfyEvent::Executing {
            node: data.get("node").and_then(node_id),
            prompt_id: prompt_id(),
        },
        "progress" => ComfyEvent::Progress {
            prompt_id: prompt_id(),
            node: data.get("node").and_then(node_id),
            value: data.get("value").and_then(Value::as_f64).unwrap_or(0.0),
            max: data.get("max").and_then(Value::as_f64).unwrap_or(0.0),
        },
        "progress_state" => ComfyEvent::ProgressState {
            prompt_id: prompt_id(),
            raw: data.clone(),
        },
        "executed" => ComfyEvent::Executed {
            prompt_id: prompt_id(),
            node: data.get("node").and_then(node_id).unwrap_or_default(),
            output: data.get("output").cloned().unwrap_or(Value::Null),
        },
        "execution_success" => ComfyEvent::ExecutionSuccess {
            prompt_id: required_prompt_id(),
        },
        "execution_error" => ComfyEvent::ExecutionError(ExecutionErrorEvent {
            prompt_id: required_prompt_id(),
            node_id: data.get("node_id").and_then(node_id),
            node_type: str_field(data, "node_type"),
            exception_type: str_field(data, "exception_type"),
            exception_message: str_field(data, "exception_message").unwrap_or_default(),
            traceback: traceback(data.get("traceback")),
        }),
        "execution_interrupted" => ComfyEvent::ExecutionInterrupted {
            prompt_id: required_prompt_id(),
            node_id: data.get("node_id").and_then(node_id),
            node_type: str_field(data, "node_type"),
        },
        "" => unknown("untyped"),
        other => unknown(other),
    }
}

/// Parses a binary frame. Unknown types and short frames become [`ComfyEvent::Unknown`].
pub fn parse_binary(frame: Bytes) -> ComfyEvent {
    let Some(event_type) = read_u32(&frame, 0) else {
        return unknown("binary-short");
    };
    match event_type {
        BINARY_PREVIEW_IMAGE => {
            let Some(format) = read_u32(&frame, 4) else {
                return unknown("binary-short");
            };
            let mime = match format {
                1 => "image/jpeg",
                2 => "image/png",
                _ => "application/octet-stream",
            };
            ComfyEvent::Preview(Preview {
                mime: mime.to_string(),
                image: frame.slice(8..),
                prompt_id: None,
                node_id: None,
            })
        }
        BINARY_PREVIEW_WITH_METADATA => {
            let Some(header_len) = read_u32(&frame, 4) else {
                return unknown("binary-short");
            };
            let header_end = 8usize.saturating_add(header_len as usize);
            if header_end > frame.len() {
                return unknown("binary-short");
            }
            let header: Value = serde_json::from_slice(&frame[8..header_end]).unwrap_or_default();
            ComfyEvent::Preview(Preview {
                mime: str_field(&header, "image_type").unwrap_or_else(|| "image/png".into()),
                image: frame.slice(header_end..),
                prompt_id: str_field(&header, "prompt_id"),
                node_id: str_field(&header, "node_id"),
            })
        }
        BINARY_TEXT => {
            let body = &frame[4..];
            // The node id is length-prefixed; an implausible length means a bare text.
            match read_u32(body, 0).map(|len| len as usize) {
                Some(len) if 4 + len <= body.len() => ComfyEvent::Text {
                    node_id: Some(String::from_utf8_lossy(&body[4..4 + len]).into_owned()),
                    text: String::from_utf8_lossy(&body[4 + len..]).into_owned(),
                },
                _ => ComfyEvent::Text {
                    node_id: None,
                    text: String::from_utf8_lossy(body).into_owned(),
                },
            }
        }
        other => unknown(&format!("binary-{other}")),
    }
}

fn unknown(kind: &str) -> ComfyEvent {
    ComfyEvent::Unknown {
        kind: kind.to_string(),
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let slice = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([slice[0], slice[1], slice[2], slice[3]]))
}

fn str_field(data: &Value, key: &str) -> Option<String> {
    data.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Node ids are strings in ComfyUI, but API-format graphs written by hand sometimes use
/// numbers; accept both.
pub(crate) fn node_id(value: &Value) -> Option<String> {
    match value {
        Value::String(id) => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

fn as_u64(value: &Value) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_f64().filter(|v| *v >= 0.0).map(|v| v as u64))
}

pub(crate) fn traceback(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(lines)) => lines
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(text)) => vec![text.clone()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    //! Frames copied from the ComfyUI 0.3.64 recordings (a_basic, g_exec_error, h_ws_binary,
    //! j_reconnect, e_interrupt).

    use super::*;

    const PROMPT: &str = "a3e3f980-d774-466e-97ad-1df0165f6977";

    #[test]
    fn first_status_carries_sid() {
        let frame = r#"{"type": "status", "data": {"status": {"exec_info":
            {"queue_remaining": 0}}, "sid": "257e7c674ea14d868605108735ca7c97"}}"#;
        assert_eq!(
            parse_text(frame),
            ComfyEvent::Status {
                queue_remaining: Some(0),
                sid: Some("257e7c674ea14d868605108735ca7c97".into())
            }
        );
        let later = r#"{"type": "status", "data": {"status": {"exec_info":
            {"queue_remaining": 1}}}}"#;
        assert_eq!(
            parse_text(later),
            ComfyEvent::Status {
                queue_remaining: Some(1),
                sid: None
            }
        );
    }

    #[test]
    fn lifecycle_events() {
        let executing = r#"{"type": "executing", "data": {"node": "1", "display_node": "1",
            "prompt_id": "a3e3f980-d774-466e-97ad-1df0165f6977"}}"#;
        assert_eq!(
            parse_text(executing),
            ComfyEvent::Executing {
                node: Some("1".into()),
                prompt_id: Some(PROMPT.into())
            }
        );
        let done = r#"{"type": "executing", "data": {"node": null,
            "prompt_id": "a3e3f980-d774-466e-97ad-1df0165f6977"}}"#;
        assert_eq!(
            parse_text(done),
            ComfyEvent::Executing {
                node: None,
                prompt_id: Some(PROMPT.into())
            }
        );
        // j_reconnect: resent to the new socket without a prompt id.
        let resent = r#"{"type": "executing", "data": {"node": "10"}}"#;
        assert_eq!(
            parse_text(resent),
            ComfyEvent::Executing {
                node: Some("10".into()),
                prompt_id: None
            }
        );
        let cached = r#"{"type": "execution_cached", "data": {"nodes": ["1", null, "3"],
            "prompt_id": "p", "timestamp": 1}}"#;
        assert_eq!(
            parse_text(cached),
            ComfyEvent::ExecutionCached {
                prompt_id: "p".into(),
                nodes: vec!["1".into(), "3".into()]
            }
        );
        let success = r#"{"type": "execution_success", "data": {"prompt_id":
            "a3e3f980-d774-466e-97ad-1df0165f6977", "timestamp": 1796322297251}}"#;
        assert_eq!(
            parse_text(success),
            ComfyEvent::ExecutionSuccess {
                prompt_id: PROMPT.into()
            }
        );
        let progress = r#"{"type": "progress", "data": {"value": 1, "max": 2,
            "prompt_id": "p", "node": "2"}}"#;
        assert_eq!(
            parse_text(progress),
            ComfyEvent::Progress {
                prompt_id: Some("p".into()),
                node: Some("2".into()),
                value: 1.0,
                max: 2.0
            }
        );
    }

    #[test]
    fn executed_keeps_output() {
        let frame = r#"{"type": "executed", "data": {"node": "3", "display_node": "3",
            "output": {"images": [{"filename": "rec_a_00001_.png", "subfolder": "",
            "type": "output"}]}, "prompt_id": "p"}}"#;
        let ComfyEvent::Executed { node, output, .. } = parse_text(frame) else {
            panic!("not executed");
        };
        assert_eq!(node, "3");
        assert_eq!(output["images"][0]["filename"], "rec_a_00001_.png");
    }

    #[test]
    fn execution_error_fields() {
        let frame = r#"{"type": "execution_error", "data": {"prompt_id":
            "bf2c9c8c-e275-4189-8c68-dabd191abfa3", "node_id": "4", "node_type": "ImageBatch",
            "executed": ["1", "3", "2"], "exception_message": "Sizes of tensors must match
            except in dimension 0.\n", "exception_type": "RuntimeError",
            "traceback": ["  File \"/srv/comfyui/execution.py\", line 496, in execute\n"],
            "current_inputs": {}, "current_outputs": {}}}"#;
        let frame = frame.replace('\n', " ");
        let ComfyEvent::ExecutionError(err) = parse_text(&frame) else {
            panic!("not an execution error");
        };
        assert_eq!(err.node_id.as_deref(), Some("4"));
        assert_eq!(err.node_type.as_deref(), Some("ImageBatch"));
        assert_eq!(err.exception_type.as_deref(), Some("RuntimeError"));
        assert!(err.exception_message.starts_with("Sizes of tensors"));
        assert_eq!(err.traceback.len(), 1);
    }

    #[test]
    fn interrupted_and_unknown() {
        let frame = r#"{"type": "execution_interrupted", "data": {"prompt_id": "p",
            "node_id": "11", "node_type": "ImageBlur", "executed": ["1", "10"]}}"#;
        assert_eq!(
            parse_text(frame),
            ComfyEvent::ExecutionInterrupted {
                prompt_id: "p".into(),
                node_id: Some("11".into()),
                node_type: Some("ImageBlur".into())
            }
        );
        let flags = r#"{"type": "feature_flags", "data": {"supports_preview_metadata": true}}"#;
        assert_eq!(
            parse_text(flags),
            ComfyEvent::Unknown {
                kind: "feature_flags".into()
            }
        );
        assert_eq!(
            parse_text("{not json"),
            ComfyEvent::Unknown {
                kind: "malformed-json".into()
            }
        );
        assert_eq!(
            parse_text("[1]"),
            ComfyEvent::Unknown {
                kind: "untyped".into()
            }
        );
    }

    /// h_ws_binary, legacy socket: type 1, format 2 (PNG), then the PNG.
    const TYPE1_B64: &str = concat!(
        "AAAAAQAAAAKJUE5HDQoaCgAAAA1JSERSAAAAIAAAACAIAgAAAPwY7aMAAABFSURBVHgB7dKxDQAw",
        "CANBYKXsxE5sizLBV3RPbRnp5Hw9cXl1Wf67fYDCEkmEAhhwRRKhAAZckUQogAFXJBEKYMAVIdEC",
        "DIYBcjBCFVkAAAAASUVORK5CYII="
    );

    fn b64(text: &str) -> Vec<u8> {
        // A tiny decoder keeps the test free of a base64 dependency.
        const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in text.bytes().filter(|c| *c != b'=') {
            let v = TABLE.iter().position(|t| *t == c).expect("base64 digit") as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }

    #[test]
    fn binary_type1_preview_is_png() {
        let frame = Bytes::from(b64(TYPE1_B64));
        assert_eq!(frame.len(), 134);
        let ComfyEvent::Preview(preview) = parse_binary(frame) else {
            panic!("not a preview");
        };
        assert_eq!(preview.mime, "image/png");
        assert_eq!(&preview.image[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(preview.image.len(), 126);
        assert_eq!(preview.prompt_id, None);
    }

    #[test]
    fn binary_type4_preview_has_metadata() {
        let header = concat!(
            r#"{"node_id": "2", "prompt_id": "6ce2c65c-56a3-49fc-b422-35eef4db31e8", "#,
            r#""display_node_id": "2", "parent_node_id": null, "real_node_id": "2", "#,
            r#""image_type": "image/png"}"#
        )
        .as_bytes();
        assert_eq!(header.len(), 0xa5);
        let mut frame = vec![0, 0, 0, 4, 0, 0, 0, 0xa5];
        frame.extend_from_slice(header);
        frame.extend_from_slice(b"\x89PNG\r\n\x1a\nrest");
        let ComfyEvent::Preview(preview) = parse_binary(Bytes::from(frame)) else {
            panic!("not a preview");
        };
        assert_eq!(preview.mime, "image/png");
        assert_eq!(preview.node_id.as_deref(), Some("2"));
        assert_eq!(
            preview.prompt_id.as_deref(),
            Some("6ce2c65c-56a3-49fc-b422-35eef4db31e8")
        );
        assert_eq!(&preview.image[..], b"\x89PNG\r\n\x1a\nrest");
    }

    #[test]
    fn binary_text_and_oddities() {
        let mut frame = vec![0, 0, 0, 3, 0, 0, 0, 2];
        frame.extend_from_slice(b"12loading model");
        assert_eq!(
            parse_binary(Bytes::from(frame)),
            ComfyEvent::Text {
                node_id: Some("12".into()),
                text: "loading model".into()
            }
        );
        assert_eq!(
            parse_binary(Bytes::from_static(b"\0\0")),
            unknown("binary-short")
        );
        assert_eq!(
            parse_binary(Bytes::from_static(b"\0\0\0\x09abc")),
            unknown("binary-9")
        );
        // A header length pointing past the end must not panic.
        assert_eq!(
            parse_binary(Bytes::from_static(b"\0\0\0\x04\xff\xff\xff\xff{}")),
            unknown("binary-short")
        );
        // JSON in a binary frame is never parsed as an event.
        assert_eq!(
            parse_binary(Bytes::from_static(br#"{"type":"status"}"#)).prompt_id(),
            None
        );
    }
}
