//! LangFlow's answers, read without any I/O: run results, stream events, error bodies.
//!
//! Reading is tolerant where LangFlow varies between versions and flows (where the text sits,
//! which events a stream sends) and strict only where correctness depends on it (the session
//! id, checked by the caller).

use serde_json::Value;

use super::LangflowError;

/// Largest stream event we buffer before calling the stream broken (an `end` event repeats
/// the whole result, so it can be large, but not unbounded).
pub const MAX_STREAM_EVENT: usize = 16 * 1024 * 1024;

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunAnswer {
    /// The session the answer is for, as LangFlow reports it.
    pub session_id: Option<String>,
    /// The flow's text output.
    pub text: String,
    /// The whole result, for steps that want more than the text.
    pub raw: Value,
}

impl RunAnswer {
    pub fn from_result(raw: Value) -> RunAnswer {
        RunAnswer {
            session_id: raw
                .get("session_id")
                .and_then(Value::as_str)
                .map(str::to_string),
            text: answer_text(&raw).unwrap_or_default(),
            raw,
        }
    }
}

/// One message LangFlow stored for a session (`GET /api/v1/monitor/messages`, as in
/// 08_flow_readback_and_messages). A run stores the user's message when it starts and the
/// flow's answer (`sender: Machine`) when it ends; a component that raises stores a message
/// of category `error` instead of the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionMessage {
    pub id: String,
    /// The flow's UUID (never its endpoint name).
    pub flow_id: Option<String>,
    pub session_id: Option<String>,
    /// `User`, `Machine`, or a component's name for an error.
    pub sender: String,
    pub text: String,
    /// `message`, or `error` for a component's failure.
    pub category: String,
    /// LangFlow's text form, `2026-12-03 18:12:18.808661 UTC`: sorts by time.
    pub timestamp: String,
}

impl SessionMessage {
    /// Reads one entry leniently: missing fields become empty, never an error.
    pub fn from_value(value: &Value) -> SessionMessage {
        let text = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let optional = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
        SessionMessage {
            id: text("id"),
            flow_id: optional("flow_id"),
            session_id: optional("session_id"),
            sender: text("sender"),
            text: text("text"),
            category: optional("category").unwrap_or_else(|| "message".into()),
            timestamp: text("timestamp"),
        }
    }

    pub fn is_user(&self) -> bool {
        self.sender == "User"
    }

    pub fn is_answer(&self) -> bool {
        self.sender == "Machine" && self.category != "error"
    }

    pub fn is_error(&self) -> bool {
        self.category == "error"
    }
}

/// The text of a run result: `outputs[0].outputs[0].results.message.text`, else the message's
/// `data.text`, the output's `messages`, `artifacts` or `outputs` texts.
pub fn answer_text(result: &Value) -> Option<String> {
    let output = result.pointer("/outputs/0/outputs/0")?;
    let candidates = [
        output.pointer("/results/message/text"),
        output.pointer("/results/message/data/text"),
        output.pointer("/results/text/text"),
        output.pointer("/messages/0/message"),
        output.pointer("/artifacts/message"),
        output.pointer("/outputs/message/message"),
    ];
    candidates
        .into_iter()
        .flatten()
        .find_map(|value| value.as_str().map(str::to_string))
}

/// One event of a `?stream=true` run.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// A chunk of generated text.
    Token(String),
    /// A message was added (the user's input, a component's output); kept raw.
    AddMessage(Value),
    /// The run finished; `result` has the shape of a plain run's answer.
    End(Value),
    /// The run failed.
    Error(String),
    /// An event type this client does not use.
    Other(String),
}

/// Parses one blank-line-separated block: a bare JSON `{event, data}` (a `data:` prefix, as
/// in proper SSE, is accepted too). `None` for an empty or unreadable block.
pub fn parse_stream_event(block: &str) -> Option<StreamEvent> {
    let block = block.trim();
    let json = block.strip_prefix("data:").unwrap_or(block).trim();
    if json.is_empty() {
        return None;
    }
    let event: Value = serde_json::from_str(json).ok()?;
    // A server that ignored `stream=true` sends one plain run answer.
    if event.get("event").is_none() && event.get("outputs").is_some() {
        return Some(StreamEvent::End(event));
    }
    let data = event.get("data").cloned().unwrap_or(Value::Null);
    Some(
        match event.get("event").and_then(Value::as_str).unwrap_or("") {
            "token" => StreamEvent::Token(
                data.get("chunk")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ),
            "add_message" => StreamEvent::AddMessage(data),
            "end" => StreamEvent::End(data.get("result").cloned().unwrap_or(Value::Null)),
            "error" => StreamEvent::Error(stream_error_message(&data)),
            other => StreamEvent::Other(other.to_string()),
        },
    )
}

/// An `error` event comes in two shapes (09): a message whose `text` is the component's
/// error, and `{error: "500: {json}"}` once the run gives up.
fn stream_error_message(data: &Value) -> String {
    if let Some(error) = data.get("error").and_then(Value::as_str) {
        let (_, body) = error.split_once(": ").unwrap_or(("", error));
        return decode_detail(body);
    }
    let source = data
        .pointer("/properties/source/display_name")
        .and_then(Value::as_str);
    let text = data
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or("unknown error")
        .trim();
    match source {
        Some(component) => format!("{component}: {text}"),
        None => text.to_string(),
    }
}

/// Splits a byte stream into blank-line-separated blocks, across chunk boundaries.
///
/// An `end` event repeats the whole result and can arrive in thousands of small chunks, so
/// each push searches only the bytes not searched before (plus the 3 before them, where a
/// separator split across chunks may start) and drains the buffer once: linear in the
/// stream's length, not quadratic in the event's.
#[derive(Debug, Default)]
pub struct BlockSplitter {
    buffer: Vec<u8>,
    /// Where the next search for a blank line starts: no separator begins before it.
    searched: usize,
}

impl BlockSplitter {
    /// Adds a chunk and returns the blocks it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<String>, String> {
        self.buffer.extend_from_slice(chunk);
        let mut blocks = Vec::new();
        let mut start = 0;
        let mut from = self.searched;
        while let Some((at, sep)) = find_blank_line(&self.buffer[from..]) {
            let end = from + at;
            blocks.push(String::from_utf8_lossy(&self.buffer[start..end]).into_owned());
            start = end + sep;
            from = start;
        }
        self.buffer.drain(..start);
        // The longest separator is 4 bytes: one that starts in the last 3 may still complete.
        self.searched = self.buffer.len().saturating_sub(3);
        if self.buffer.len() > MAX_STREAM_EVENT {
            return Err(format!("a stream event exceeds {MAX_STREAM_EVENT} bytes"));
        }
        Ok(blocks)
    }

    /// What is left when the stream ends (a last event without its blank line).
    pub fn finish(self) -> Option<String> {
        let rest = String::from_utf8_lossy(&self.buffer).trim().to_string();
        (!rest.is_empty()).then_some(rest)
    }
}

/// Position and length of the first `\n\n` or `\r\n\r\n`, in one pass over the bytes (two
/// searches, one per separator, would each run to the end when only the other one is there).
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(at) = buffer[from..].iter().position(|&byte| byte == b'\n') {
        let newline = from + at;
        if buffer.get(newline + 1) == Some(&b'\n') {
            return Some((newline, 2));
        }
        let after_cr = newline > 0 && buffer[newline - 1] == b'\r';
        if after_cr && buffer.get(newline + 1..newline + 3) == Some(b"\r\n") {
            return Some((newline - 1, 4));
        }
        from = newline + 1;
    }
    None
}

/// Maps an error status to the error it means. `body` is the raw answer.
pub fn error_from_status(flow: &str, status: u16, body: &str) -> LangflowError {
    let json: Option<Value> = serde_json::from_str(body).ok();
    let detail = json
        .as_ref()
        .map(detail_text)
        .unwrap_or_else(|| short(body));
    let flow = flow.to_string();
    match status {
        404 => LangflowError::NotFound { flow },
        401 | 403 => LangflowError::Forbidden { flow, detail },
        400 => LangflowError::BadRequest { flow, detail },
        422 => LangflowError::Validation { flow, detail },
        502..=504 if json.is_none() => LangflowError::UnknownOutcome { flow, status },
        _ => LangflowError::Server {
            flow,
            status,
            detail,
        },
    }
}

/// The message in a FastAPI error body: `detail` as a string (JSON inside a string is
/// decoded), or a list of validation problems.
fn detail_text(body: &Value) -> String {
    match body.get("detail") {
        Some(Value::String(detail)) => decode_detail(detail),
        Some(Value::Array(problems)) => problems
            .iter()
            .map(|problem| {
                let msg = problem
                    .get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or("invalid");
                let loc: Vec<String> = problem
                    .get("loc")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|part| {
                        part.as_str()
                            .map_or_else(|| part.to_string(), str::to_string)
                    })
                    .collect();
                format!("{msg} at {}", loc.join("."))
            })
            .collect::<Vec<_>>()
            .join("; "),
        Some(other) => other.to_string(),
        None => short(&body.to_string()),
    }
}

/// LangFlow puts `{"message": ..., "traceback": ...}` as a JSON string inside `detail`.
fn decode_detail(detail: &str) -> String {
    match serde_json::from_str::<Value>(detail) {
        Ok(inner) => inner
            .get("message")
            .and_then(Value::as_str)
            .map(|message| message.trim().to_string())
            .unwrap_or_else(|| detail.to_string()),
        Err(_) => detail.trim().to_string(),
    }
}

fn short(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! Bodies trimmed from the LangFlow 1.13 recordings (04, 05, 06, 09).

    use serde_json::json;

    use super::*;

    #[test]
    fn text_from_a_run_answer() {
        let answer = json!({"session_id": "sess-2c1230b8", "outputs": [{"inputs":
            {"input_value": "graph-42"}, "outputs": [{"results": {"message": {"text_key": "text",
            "data": {"text": "graph-42 :: [processed by langflow]"}, "sender": "Machine",
            "text": "graph-42 :: [processed by langflow]"}},
            "artifacts": {"message": "graph-42 :: [processed by langflow]"},
            "messages": [{"message": "graph-42 :: [processed by langflow]",
                "component_id": "ChatOutput-bbbb3"}]}]}]});
        let run = RunAnswer::from_result(answer);
        assert_eq!(run.session_id.as_deref(), Some("sess-2c1230b8"));
        assert_eq!(run.text, "graph-42 :: [processed by langflow]");

        let fallback = json!({"outputs": [{"outputs": [{"results": {},
            "messages": [], "artifacts": {"message": "from artifacts"}}]}]});
        assert_eq!(answer_text(&fallback).as_deref(), Some("from artifacts"));
        assert_eq!(answer_text(&json!({"outputs": []})), None);
    }

    #[test]
    fn errors_from_status() {
        let not_found = r#"{"detail": "Flow identifier no-such-flow-name not found"}"#;
        assert!(matches!(
            error_from_status("no-such-flow-name", 404, not_found),
            LangflowError::NotFound { flow } if flow == "no-such-flow-name"
        ));
        let forbidden = r#"{"detail": "Invalid or missing API key"}"#;
        assert_eq!(
            error_from_status("f", 403, forbidden).to_string(),
            "LangFlow refused access to flow f: Invalid or missing API key"
        );
        let invalid = r#"{"detail": [{"type": "json_invalid", "loc": ["body", 21],
            "msg": "JSON decode error"}]}"#;
        assert_eq!(
            error_from_status("f", 422, invalid).to_string(),
            "LangFlow could not validate the request for flow f: JSON decode error at body.21"
        );
        let runtime = concat!(
            r#"{"detail": "{\"message\":\"Error running graph: Error building Component "#,
            r#"Combine Text: \\n\\ndeliberate failure for daemon tests\",\"traceback\":null,"#,
            r#"\"description\":null,\"code\":null,\"suggestion\":null}"}"#
        );
        let err = error_from_status("lf-fail", 500, runtime);
        assert_eq!(
            err.to_string(),
            "flow lf-fail failed (500): Error running graph: Error building Component Combine \
             Text: \n\ndeliberate failure for daemon tests"
        );
        assert!(!err.is_retryable());
        let gateway = "<html><body><h1>504 Gateway Time-out</h1></body></html>";
        let err = error_from_status("f", 504, gateway);
        assert!(matches!(
            err,
            LangflowError::UnknownOutcome { status: 504, .. }
        ));
        assert!(err.is_retryable());
    }

    #[test]
    fn stream_blocks_split_across_chunks() {
        let mut splitter = BlockSplitter::default();
        assert!(splitter
            .push(br#"{"event": "token", "data": {"ch"#)
            .unwrap()
            .is_empty());
        let blocks = splitter
            .push(b"unk\": \"Hel\"}}\n\n{\"event\": \"token\"")
            .unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(
            parse_stream_event(&blocks[0]),
            Some(StreamEvent::Token("Hel".into()))
        );
        let blocks = splitter
            .push(b", \"data\": {\"chunk\": \"lo\"}}\r\n\r\n")
            .unwrap();
        assert_eq!(
            parse_stream_event(&blocks[0]),
            Some(StreamEvent::Token("lo".into()))
        );
        assert!(splitter
            .push(b"{\"event\": \"end\", \"data\": {}}")
            .unwrap()
            .is_empty());
        assert_eq!(
            splitter.finish().as_deref(),
            Some(r#"{"event": "end", "data": {}}"#)
        );
    }

    /// A multi-MB `end` event in 16-byte chunks, with separators split across chunks:
    /// every block comes out whole, and the splitter keeps up (a rescan of the buffer per
    /// chunk would take minutes here).
    #[test]
    fn a_large_event_in_small_chunks_splits_whole() {
        let text = "x".repeat(4 * 1024 * 1024);
        let end = format!(r#"{{"event": "end", "data": {{"result": {{"text": "{text}"}}}}}}"#);
        let stream = format!("{{\"event\": \"token\"}}\r\n\r\n{end}\n\n{{\"event\": \"a\"}}\n\n");
        let mut splitter = BlockSplitter::default();
        let mut blocks = Vec::new();
        for chunk in stream.as_bytes().chunks(16) {
            blocks.extend(splitter.push(chunk).unwrap());
        }
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[0], r#"{"event": "token"}"#);
        assert_eq!(blocks[1].len(), end.len());
        assert!(blocks[1] == end);
        assert_eq!(blocks[2], r#"{"event": "a"}"#);
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn stream_events_from_the_recordings() {
        let end = r#"{"event": "end", "data": {"result": {"session_id": "sess-2c1230b8",
            "outputs": [{"outputs": [{"results": {"message": {"text": "stream me"}}}]}]}}}"#;
        let Some(StreamEvent::End(result)) = parse_stream_event(end) else {
            panic!("not an end event");
        };
        assert_eq!(RunAnswer::from_result(result).text, "stream me");

        let component_error = r#"{"event": "error", "data": {"text_key": "text",
            "text": "deliberate failure for daemon tests\n", "category": "error",
            "properties": {"source": {"id": "CombineText-bbbb2",
            "display_name": "Combine Text", "source": "Combine Text"}}}}"#;
        assert_eq!(
            parse_stream_event(component_error),
            Some(StreamEvent::Error(
                "Combine Text: deliberate failure for daemon tests".into()
            ))
        );
        let final_error = concat!(
            r#"{"event": "error", "data": {"error": "500: {\"message\":"#,
            r#"\"Error running graph: boom\",\"traceback\":null}"}}"#
        );
        assert_eq!(
            parse_stream_event(final_error),
            Some(StreamEvent::Error("Error running graph: boom".into()))
        );
        let added = r#"{"event": "add_message", "data": {"sender": "User", "text": "boom"}}"#;
        assert!(matches!(
            parse_stream_event(added),
            Some(StreamEvent::AddMessage(_))
        ));
        let newer = r#"data: {"event": "vertices_sorted", "data": {}}"#;
        assert_eq!(
            parse_stream_event(newer),
            Some(StreamEvent::Other("vertices_sorted".into()))
        );
        let plain = r#"{"session_id": "s", "outputs": []}"#;
        assert!(matches!(
            parse_stream_event(plain),
            Some(StreamEvent::End(_))
        ));
        assert_eq!(parse_stream_event("\n"), None);
        assert_eq!(parse_stream_event("<html>"), None);
    }
}
