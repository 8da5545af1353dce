//! The JSON shapes of LangFlow messages and run results, as recorded in
//! 04_run_json, 05_run_stream and 09_flow_runtime_error.

use std::io;

use serde::Serialize;
use serde_json::{json, Value};

/// Identifiers shared by everything one run emits.
pub(crate) struct RunIds {
    pub flow_id: String,
    pub session_id: String,
    pub run_id: String,
}

/// One chat message.
pub(crate) struct Message {
    pub id: String,
    /// `true` for the user's message, `false` for the flow's answer.
    pub from_user: bool,
    pub text: String,
    /// `(component id, display name)` of the component that produced it.
    pub source: Option<(&'static str, &'static str)>,
    pub timestamp: String,
}

/// LangFlow's message timestamp, e.g. `2026-12-03 18:12:18.825479 UTC`.
pub(crate) fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06} UTC",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

fn properties(source: Option<(&str, &str)>, error: bool) -> Value {
    let source = match source {
        Some((id, name)) => json!({"id": id, "display_name": name, "source": name}),
        None => json!({"id": null, "display_name": null, "source": null}),
    };
    let color = if error { json!("red") } else { Value::Null };
    json!({"text_color": color, "background_color": color, "edited": false, "source": source,
        "icon": if error { json!("error") } else { Value::Null }, "allow_markdown": false,
        "positive_feedback": null, "state": "complete", "targets": [], "usage": null,
        "build_duration": null})
}

impl Message {
    /// The record `GET /api/v1/monitor/messages` lists (08_flow_readback_and_messages),
    /// stamped now: LangFlow stores the answer when the run ends, not when it starts.
    pub fn record(&self, run: &RunIds) -> Value {
        let (sender, sender_name) = self.sender();
        json!({"id": self.id, "flow_id": run.flow_id, "timestamp": timestamp(),
            "sender": sender, "sender_name": sender_name, "session_id": run.session_id,
            "context_id": "", "text": self.text, "files": "[]", "edit": false,
            "duration": null, "properties": properties(self.source, false),
            "category": "message", "content_blocks": [],
            "session_metadata": {"graph_run_id": run.run_id}})
    }

    fn sender(&self) -> (&'static str, &'static str) {
        if self.from_user {
            ("User", "User")
        } else {
            ("Machine", "AI")
        }
    }

    /// The inner `data` object.
    fn data(&self, run: &RunIds) -> Value {
        let (sender, sender_name) = self.sender();
        json!({"timestamp": self.timestamp, "sender": sender, "sender_name": sender_name,
            "session_id": run.session_id, "context_id": "", "text": self.text, "files": [],
            "error": false, "edit": false, "properties": properties(self.source, false),
            "category": "message", "content_blocks": [],
            "session_metadata": {"graph_run_id": run.run_id}, "id": self.id,
            "flow_id": run.flow_id, "run_id": run.run_id, "duration": null})
    }

    /// The full message object (`results.message`); streamed `add_message`
    /// events carry it with the id appended.
    pub fn object(&self, run: &RunIds, with_id: bool) -> Value {
        let (sender, sender_name) = self.sender();
        let mut object = json!({"text_key": "text", "data": self.data(run), "default_value": "",
            "sender": sender, "sender_name": sender_name, "files": [],
            "session_id": run.session_id, "context_id": "", "run_id": run.run_id,
            "timestamp": self.timestamp, "flow_id": run.flow_id, "error": false, "edit": false,
            "properties": properties(self.source, false), "category": "message",
            "content_blocks": [], "duration": null,
            "session_metadata": {"graph_run_id": run.run_id}, "text": self.text});
        if with_id {
            object["id"] = json!(self.id);
        }
        object
    }
}

/// The 200 body of a run: `{session_id, outputs: [...]}`.
pub(crate) fn run_result(run: &RunIds, inputs: Value, answer: &Message, output_id: &str) -> Value {
    let text = &answer.text;
    let messages = if text.is_empty() {
        json!([])
    } else {
        json!([{"message": text, "sender": "Machine", "sender_name": "AI",
            "session_id": run.session_id, "stream_url": null, "component_id": output_id,
            "files": [], "type": "text"}])
    };
    let output = json!({
        "results": {"message": answer.object(run, false)},
        "artifacts": {"message": text, "sender": "Machine", "sender_name": "AI", "files": [],
            "type": "object"},
        "outputs": {"message": {"message": text, "type": "text"}},
        "logs": {"message": []},
        "messages": messages,
        "timedelta": null, "duration": null, "component_display_name": "Chat Output",
        "component_id": output_id, "used_frozen_result": false, "token_usage": null,
    });
    json!({"session_id": run.session_id, "outputs": [{"inputs": inputs, "outputs": [output]}]})
}

/// The `detail` string of a failed run: JSON inside a string.
pub(crate) fn failure_detail(component: &str, reason: &str) -> String {
    json!({"message": format!("Error running graph: Error building Component {component}: \
        \n\n{reason}"), "traceback": null, "description": null, "code": null,
        "suggestion": null})
    .to_string()
}

/// The message-shaped `error` event a failing component streams.
pub(crate) fn error_message(run: &RunIds, component: (&str, &str), reason: &str) -> Value {
    let stamp = timestamp();
    let content = json!([{"title": "Error", "contents": [{"type": "error", "duration": null,
        "header": {}, "component": component.1, "field": null,
        "reason": format!("**RuntimeError**\n - **Details: {reason}**\n"), "solution": null,
        "code": null, "traceback": format!("RuntimeError: {reason}\n")}],
        "allow_markdown": true, "media_url": null}]);
    let id = uuid::Uuid::new_v4().to_string();
    let data = json!({"timestamp": stamp, "sender": component.1, "sender_name": component.1,
        "session_id": run.session_id, "context_id": null, "text": format!("{reason}\n"),
        "files": [], "error": false, "edit": false,
        "properties": properties(Some(component), true), "category": "error",
        "content_blocks": content, "session_metadata": {"graph_run_id": run.run_id},
        "id": id, "flow_id": run.flow_id, "run_id": run.run_id, "duration": null});
    json!({"text_key": "text", "data": data, "default_value": "", "sender": component.1,
        "sender_name": component.1, "files": [], "session_id": run.session_id,
        "context_id": null, "run_id": run.run_id, "timestamp": stamp, "flow_id": run.flow_id,
        "error": false, "edit": false, "properties": properties(Some(component), true),
        "category": "error", "content_blocks": content, "duration": null,
        "session_metadata": {"graph_run_id": run.run_id}, "text": format!("{reason}\n"),
        "id": id})
}

/// The stored record of a component's failure: sender is the component, category `error`.
pub(crate) fn error_record(run: &RunIds, component: (&str, &str), reason: &str) -> Value {
    json!({"id": uuid::Uuid::new_v4().to_string(), "flow_id": run.flow_id,
        "timestamp": timestamp(), "sender": component.1, "sender_name": component.1,
        "session_id": run.session_id, "context_id": "", "text": format!("{reason}\n"),
        "files": "[]", "edit": false, "duration": null,
        "properties": properties(Some(component), true), "category": "error",
        "content_blocks": [], "session_metadata": {"graph_run_id": run.run_id}})
}

/// Writes JSON with Python's default separators (`", "` and `": "`), the
/// way LangFlow's stream lines look.
pub(crate) fn python_json(value: &Value) -> String {
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, Spaced);
    if value.serialize(&mut serializer).is_err() {
        return value.to_string();
    }
    String::from_utf8(out).unwrap_or_else(|_| value.to_string())
}
