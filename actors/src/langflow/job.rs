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

use serde_json::{Map, Value};
use tracing::{info, warn, Instrument};

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
