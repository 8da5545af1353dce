//! Running one LangFlow step: upload its files, build the request, run it streamed.
//!
//! Files are uploaded to the flow and attached as a `files` tweak on the flow's configured
//! file component (its Chat Input), which is how LangFlow hands images to a vision model.
//!
//! `input_value` and the input component: LangFlow refuses (400) a request that sets the input
//! both at the top level and in a tweak of the input component. The rule here: the job's
//! `input_value` is the upstream data and wins. When it is non-empty it is sent at the top level
//! and an `input_value` in a tweak of the input component (the file component, or any
//! `ChatInput-*` / `TextInput-*`) is dropped with a warning; when it is empty, no top-level
//! `input_value` is sent, so a tweak may provide it.
//!
//! Recovery: a daemon that restarted while a run was in flight, or got a proxy's 502/503/504
//! (unknown outcome), asks [`recover_job`] before running the step again. LangFlow keeps the
//! session's messages (user message at the start, answer at the end), so the answer can be
//! taken from there instead of running an LLM flow twice.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tracing::{debug, info, warn, Instrument};

use super::answer::SessionMessage;
use super::client::{LangflowClient, RunRequest};
use super::LangflowError;
use crate::config::FlowConfig;
use crate::workflow::LangflowJob;

/// Runs `job` on the flow `flow` and returns its text. Tokens go to `on_token` as they come.
/// `session_id` is ours (the step's), sent at the top level and checked in the answer.
pub async fn run_job(
    client: &LangflowClient,
    job: &LangflowJob,
    flow: &FlowConfig,
    session_id: &str,
    on_token: impl FnMut(&str),
) -> Result<String, LangflowError> {
    let span =
        tracing::info_span!("langflow_job", flow = %job.flow, flow_id = %flow.id, session_id);
    async {
        let mut tweaks = job.tweaks.clone();
        if !job.files.is_empty() {
            let component =
                flow.file_component
                    .as_deref()
                    .ok_or_else(|| LangflowError::NoFileComponent {
                        flow: job.flow.clone(),
                    })?;
            let mut paths = Vec::with_capacity(job.files.len());
            for path in &job.files {
                paths.push(Value::String(client.upload_file(&flow.id, path).await?));
            }
            attach_files(&mut tweaks, component, paths);
        }
        let input_value = settle_input(
            &job.input_value,
            &mut tweaks,
            flow.file_component.as_deref(),
        );
        let request = RunRequest {
            input_value,
            input_type: or_chat(&job.input_type),
            output_type: or_chat(&job.output_type),
            tweaks,
            session_id: session_id.to_string(),
        };
        let answer = client.run_stream(&flow.id, &request, on_token).await?;
        info!(chars = answer.text.len(), "flow finished");
        Ok(answer.text)
    }
    .instrument(span)
    .await
}

/// How long [`recover_job`] waits for an answer to a run that has started (a user message is
/// stored) but not answered. A minute covers a typical LLM flow and matches the timeout of
/// the proxies in front of LangFlow (which then answer 502, 503 or 504); a run still silent
/// after that has most likely died with the request that started it.
pub const RECOVERY_WAIT: Duration = Duration::from_secs(60);

/// Pauses between two reads of the messages while waiting, doubling from the first.
const RECOVERY_POLL_MIN: Duration = Duration::from_millis(100);
const RECOVERY_POLL_MAX: Duration = Duration::from_secs(5);

/// What LangFlow's stored messages say about a run we may have started before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The flow answered: the text of its (last) `Machine` message. Use it; do not run again.
    Finished(String),
    /// No message of the flow in the session: the run never reached LangFlow, so running the
    /// step now is safe. (A request sent the instant before a crash may not have stored its
    /// message yet; that window is the few milliseconds LangFlow takes to start a flow.)
    NotStarted,
    /// A user message with no answer after [`RECOVERY_WAIT`]: the run died, or is still going.
    /// Running again risks doing the work twice; the caller decides.
    Unfinished,
}

/// Learns the outcome of a run of `job` on `flow` under our `session_id`, waiting up to
/// [`RECOVERY_WAIT`] for a started run to answer. A failure the flow recorded (a message of
/// category `error` after the user's) is returned as [`LangflowError::Flow`]; transport
/// errors are returned as they are (retryable).
pub async fn recover_job(
    client: &LangflowClient,
    job: &LangflowJob,
    flow: &FlowConfig,
    session_id: &str,
) -> Result<Recovery, LangflowError> {
    recover_job_within(client, job, flow, session_id, RECOVERY_WAIT).await
}

/// [`recover_job`] with another bound on the wait for an unanswered run.
pub async fn recover_job_within(
    client: &LangflowClient,
    job: &LangflowJob,
    flow: &FlowConfig,
    session_id: &str,
    wait: Duration,
) -> Result<Recovery, LangflowError> {
    let span = tracing::info_span!("langflow_recover", flow = %job.flow, session_id);
    async {
        let since = Instant::now();
        let mut pause = RECOVERY_POLL_MIN;
        loop {
            let messages = client.session_messages(session_id).await?;
            match read_outcome(&messages, &flow.id) {
                Outcome::Answered(text) => {
                    info!(chars = text.len(), "run had finished; answer recovered");
                    return Ok(Recovery::Finished(text));
                }
                Outcome::Failed(message) => {
                    warn!(%message, "run had failed");
                    return Err(LangflowError::Flow {
                        flow: job.flow.clone(),
                        message,
                    });
                }
                Outcome::Nothing => {
                    info!("no message for the session: the run never started");
                    return Ok(Recovery::NotStarted);
                }
                Outcome::Asked => {}
            }
            let left = wait.saturating_sub(since.elapsed());
            if left.is_zero() {
                warn!(
                    waited_ms = wait.as_millis() as u64,
                    "run started but never answered"
                );
                return Ok(Recovery::Unfinished);
            }
            debug!("run started, no answer yet; waiting");
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(RECOVERY_POLL_MAX);
        }
    }
    .instrument(span)
    .await
}

/// What the messages say about the latest run of one flow.
#[derive(Debug, PartialEq)]
enum Outcome {
    Answered(String),
    Failed(String),
    /// A user message, nothing after it yet.
    Asked,
    Nothing,
}

/// Reads the latest run of `flow_id` from a session's messages (oldest first). A session may
/// hold several flows' runs, so only messages of `flow_id` count; when `flow_id` is an
/// endpoint name (messages carry only UUIDs), every message of the session counts, which is
/// right because our session ids are per step.
fn read_outcome(messages: &[SessionMessage], flow_id: &str) -> Outcome {
    let named = |m: &&SessionMessage| m.flow_id.as_deref() == Some(flow_id);
    let by_uuid = uuid::Uuid::parse_str(flow_id).is_ok();
    let ours: Vec<&SessionMessage> = if by_uuid || messages.iter().any(|m| named(&m)) {
        messages.iter().filter(named).collect()
    } else {
        messages.iter().collect()
    };
    // The answer to the latest question; a retried run asks again.
    let Some(asked) = ours.iter().rposition(|m| m.is_user()) else {
        // An answer without a question is odd (deleted messages?) but still an answer.
        return match ours.iter().rev().find(|m| m.is_answer()) {
            Some(answer) => Outcome::Answered(answer.text.clone()),
            None => Outcome::Nothing,
        };
    };
    let after = &ours[asked + 1..];
    if let Some(answer) = after.iter().rev().find(|m| m.is_answer()) {
        return Outcome::Answered(answer.text.clone());
    }
    match after.iter().find(|m| m.is_error()) {
        Some(error) => Outcome::Failed(error.text.trim_end().to_string()),
        None => Outcome::Asked,
    }
}

/// Adds uploaded paths to `tweaks[component].files` (after any files the step set itself).
pub fn attach_files(tweaks: &mut Map<String, Value>, component: &str, paths: Vec<Value>) {
    let tweak = tweaks
        .entry(component)
        .or_insert_with(|| Value::Object(Map::new()));
    if !tweak.is_object() {
        *tweak = Value::Object(Map::new());
    }
    let Some(tweak) = tweak.as_object_mut() else {
        return;
    };
    match tweak.get_mut("files") {
        Some(Value::Array(existing)) => existing.extend(paths),
        _ => {
            tweak.insert("files".into(), Value::Array(paths));
        }
    }
}

/// Applies the module's `input_value` rule and returns the top-level value to send.
pub fn settle_input(
    input_value: &str,
    tweaks: &mut Map<String, Value>,
    input_component: Option<&str>,
) -> Option<String> {
    if input_value.is_empty() {
        return None;
    }
    for (component, tweak) in tweaks.iter_mut() {
        let is_input = Some(component.as_str()) == input_component
            || component.starts_with("ChatInput-")
            || component.starts_with("TextInput-");
        if !is_input {
            continue;
        }
        if let Some(fields) = tweak.as_object_mut() {
            if fields.remove("input_value").is_some() {
                warn!(component = %component, "tweak input_value dropped: the step input wins");
            }
        }
    }
    Some(input_value.to_string())
}

fn or_chat(kind: &str) -> String {
    if kind.is_empty() { "chat" } else { kind }.to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn step_input_wins_over_an_input_component_tweak() {
        let mut tweaks = map(json!({
            "ChatInput-aaaa1": {"input_value": "from tweak", "sender": "User"},
            "CombineText-bbbb2": {"input_value": "kept", "delimiter": " >> "}}));
        let sent = settle_input("upstream text", &mut tweaks, None);
        assert_eq!(sent.as_deref(), Some("upstream text"));
        assert_eq!(tweaks["ChatInput-aaaa1"], json!({"sender": "User"}));
        assert_eq!(tweaks["CombineText-bbbb2"]["input_value"], "kept");
    }

    #[test]
    fn empty_step_input_leaves_the_tweak_alone() {
        let mut tweaks = map(json!({"Input-x": {"input_value": "from tweak"}}));
        assert_eq!(settle_input("", &mut tweaks, Some("Input-x")), None);
        assert_eq!(tweaks["Input-x"]["input_value"], "from tweak");
    }

    fn message(flow: &str, sender: &str, text: &str, category: &str) -> SessionMessage {
        SessionMessage::from_value(&json!({"id": "m", "flow_id": flow, "session_id": "s",
            "sender": sender, "text": text, "category": category,
            "timestamp": "2026-12-03 18:12:18.808661 UTC"}))
    }

    /// 08_flow_readback_and_messages: two flows ran in one session, one of them twice.
    #[test]
    fn outcome_is_the_answer_to_the_latest_question_of_the_flow() {
        let (echo, combine) = (
            "d0269e28-58ce-43d1-9678-d2bef12cf40c",
            "11b80092-cd93-43c2-8eb0-11f4ecfabf43",
        );
        let messages = vec![
            message(echo, "User", "hello", "message"),
            message(echo, "Machine", "hello", "message"),
            message(combine, "User", "graph-42", "message"),
            message(combine, "Machine", "graph-42 :: done", "message"),
            message(combine, "User", "graph-43", "message"),
        ];
        assert_eq!(
            read_outcome(&messages, echo),
            Outcome::Answered("hello".into())
        );
        assert_eq!(read_outcome(&messages, combine), Outcome::Asked);
        assert_eq!(
            read_outcome(&messages, "6f1c3a52-0000-0000-0000-000000000000"),
            Outcome::Nothing
        );
        // An endpoint name matches no flow_id: the whole session counts.
        assert_eq!(read_outcome(&messages, "lf-combine"), Outcome::Asked);
        let failed = vec![
            message(echo, "User", "hello", "message"),
            message(echo, "Chat Output", "boom\n", "error"),
        ];
        assert_eq!(read_outcome(&failed, echo), Outcome::Failed("boom".into()));
        assert_eq!(read_outcome(&[], echo), Outcome::Nothing);
    }

    #[test]
    fn files_are_attached_to_the_file_component() {
        let mut tweaks = map(json!({"ChatInput-aaaa1": {"files": ["flow/a.png"]}}));
        attach_files(&mut tweaks, "ChatInput-aaaa1", vec![json!("flow/b.png")]);
        attach_files(&mut tweaks, "Other-1", vec![json!("flow/c.png")]);
        assert_eq!(
            tweaks["ChatInput-aaaa1"]["files"],
            json!(["flow/a.png", "flow/b.png"])
        );
        assert_eq!(tweaks["Other-1"], json!({"files": ["flow/c.png"]}));
    }
}
