//! LangFlow's HTTP API: health, file upload, and runs (plain or streamed).

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::HeaderValue;
use reqwest::multipart::{Form, Part};
use reqwest::{RequestBuilder, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_util::io::ReaderStream;
use tracing::{debug, warn};
use url::Url;

use super::answer::{
    error_from_status, parse_stream_event, BlockSplitter, RunAnswer, SessionMessage, StreamEvent,
};
use super::LangflowError;
use crate::config::LangflowServiceConfig;

/// How long to wait for a TCP connection before calling LangFlow unreachable. Runs themselves
/// have no client-side timeout: an LLM flow may take minutes, and a proxy in front of LangFlow
/// reports its own timeout (see [`LangflowError::UnknownOutcome`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest the health check and a session's message lookup may take, answer included: a
/// server that accepts connections but never answers must fail the probe, not stall it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a file upload may take: bounded, but long enough for a video over a slow link.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A client for one LangFlow server. Cheap to clone. Its `Debug` output hides the API key.
#[derive(Clone)]
pub struct LangflowClient {
    http: reqwest::Client,
    base: Url,
    api_key: Option<String>,
}

impl std::fmt::Debug for LangflowClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LangflowClient")
            .field("base", &self.base.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The body of `POST /api/v1/run/{flow}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunRequest {
    /// Omitted when a tweak of the input component sets it instead (LangFlow refuses both).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_value: Option<String>,
    /// `chat`, `text` or `any`.
    pub input_type: String,
    /// `chat`, `text` or `any`.
    pub output_type: String,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub tweaks: Map<String, Value>,
    /// Ours, always; the answer must echo it.
    pub session_id: String,
}

impl LangflowClient {
    pub fn new(base: Url, api_key: Option<String>) -> LangflowClient {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            // Building fails only if the TLS backend cannot initialise: a broken install.
            .unwrap_or_else(|_| reqwest::Client::new());
        LangflowClient {
            http,
            base,
            api_key,
        }
    }

    pub fn from_config(config: &LangflowServiceConfig) -> LangflowClient {
        LangflowClient::new(config.url.clone(), config.api_key.clone())
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// `GET /health_check` (`/health` answers before the app is ready): `Ok` when LangFlow
    /// and its database report `ok`.
    pub async fn health(&self) -> Result<(), LangflowError> {
        let flow = "(health check)";
        let url = self.url(flow, "health_check")?;
        let request = self.http.get(url.clone()).timeout(REQUEST_TIMEOUT);
        let response = self.send(flow, &url, request).await?;
        let answer = json_answer(flow, &url, response).await?;
        let bad: Vec<String> = answer
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, value)| value.as_str().is_some_and(|state| state != "ok"))
            .map(|(key, value)| format!("{key}: {}", value.as_str().unwrap_or_default()))
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(LangflowError::Server {
                flow: flow.into(),
                status: 200,
                detail: bad.join(", "),
            })
        }
    }

    /// Uploads a file for a flow (`POST /api/v1/files/upload/{flow_id}`, multipart `file`,
    /// streamed from disk) and returns the server-side path to put in a `files` tweak.
    /// `flow_id` must be the flow's UUID, not its endpoint name. The v1 endpoint is used
    /// because v2 takes no images.
    pub async fn upload_file(&self, flow_id: &str, path: &Path) -> Result<String, LangflowError> {
        let io_error = |source| LangflowError::Io {
            flow: flow_id.into(),
            path: path.to_path_buf(),
            source,
        };
        let file = tokio::fs::File::open(path).await.map_err(io_error)?;
        let len = file.metadata().await.map_err(io_error)?.len();
        let filename = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "upload".into());
        let (_, mime) = crate::artifact::classify_filename(&filename);
        let part =
            Part::stream_with_length(reqwest::Body::wrap_stream(ReaderStream::new(file)), len)
                .file_name(filename.clone())
                .mime_str(mime)
                .map_err(|err| LangflowError::Decode {
                    flow: flow_id.into(),
                    detail: err.to_string(),
                })?;
        let url = self.url(flow_id, &format!("api/v1/files/upload/{}", encode(flow_id)))?;
        let request = self
            .http
            .post(url.clone())
            .timeout(UPLOAD_TIMEOUT)
            .multipart(Form::new().part("file", part));
        let response = self.send(flow_id, &url, request).await?;
        let answer = json_answer(flow_id, &url, response).await?;
        let file_path = answer
            .get("file_path")
            .and_then(Value::as_str)
            .ok_or_else(|| LangflowError::Decode {
                flow: flow_id.into(),
                detail: format!("no `file_path` in the upload answer {answer}"),
            })?;
        debug!(flow = flow_id, file = %filename, bytes = len, stored = file_path, "file uploaded");
        Ok(file_path.to_string())
    }

    /// Runs a flow and waits for its whole answer, which must be for `request.session_id`.
    pub async fn run(&self, flow: &str, request: &RunRequest) -> Result<RunAnswer, LangflowError> {
        let url = self.url(flow, &format!("api/v1/run/{}", encode(flow)))?;
        let response = self
            .send(flow, &url, self.http.post(url.clone()).json(request))
            .await?;
        let answer = RunAnswer::from_result(json_answer(flow, &url, response).await?);
        check_session(flow, &request.session_id, answer)
    }

    /// Runs a flow with `?stream=true`, handing each token to `on_token` as it arrives. The
    /// text is taken from the `end` event, so flows that stream no tokens work the same.
    pub async fn run_stream(
        &self,
        flow: &str,
        request: &RunRequest,
        mut on_token: impl FnMut(&str),
    ) -> Result<RunAnswer, LangflowError> {
        let mut url = self.url(flow, &format!("api/v1/run/{}", encode(flow)))?;
        url.query_pairs_mut().append_pair("stream", "true");
        let response = self
            .send(flow, &url, self.http.post(url.clone()).json(request))
            .await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(error_from_status(flow, status.as_u16(), &body));
        }

        let mut splitter = BlockSplitter::default();
        let mut body = response.bytes_stream();
        let mut handle = |block: &str| -> Option<Result<RunAnswer, LangflowError>> {
            match parse_stream_event(block)? {
                StreamEvent::Token(chunk) => on_token(&chunk),
                StreamEvent::End(result) => return Some(Ok(RunAnswer::from_result(result))),
                StreamEvent::Error(message) => {
                    return Some(Err(LangflowError::Flow {
                        flow: flow.into(),
                        message,
                    }));
                }
                StreamEvent::AddMessage(_) => {}
                StreamEvent::Other(kind) => debug!(flow, event = %kind, "stream event skipped"),
            }
            None
        };
        let transport = |detail: String| LangflowError::Transport {
            flow: flow.into(),
            url: url.to_string(),
            detail,
        };
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|err| transport(err.to_string()))?;
            for block in splitter.push(&chunk).map_err(&transport)? {
                if let Some(outcome) = handle(&block) {
                    return check_session(flow, &request.session_id, outcome?);
                }
            }
        }
        if let Some(outcome) = splitter.finish().and_then(|block| handle(&block)) {
            return check_session(flow, &request.session_id, outcome?);
        }
        warn!(flow, "stream ended without an end event");
        Err(transport("the stream ended before its `end` event".into()))
    }

    /// `GET /api/v1/monitor/messages?session_id=...`: every message LangFlow stored for the
    /// session, oldest first, across all flows run in it. How a restarted daemon learns what
    /// became of a run whose answer it never read.
    pub async fn session_messages(
        &self,
        session_id: &str,
    ) -> Result<Vec<SessionMessage>, LangflowError> {
        let label = format!("(messages of session {session_id})");
        let mut url = self.url(&label, "api/v1/monitor/messages")?;
        url.query_pairs_mut().append_pair("session_id", session_id);
        let request = self.http.get(url.clone()).timeout(REQUEST_TIMEOUT);
        let response = self.send(&label, &url, request).await?;
        let answer = json_answer(&label, &url, response).await?;
        let Some(entries) = answer.as_array() else {
            return Err(LangflowError::Decode {
                flow: label,
                detail: format!("messages answer is not a list: {}", short_json(&answer)),
            });
        };
        let mut messages: Vec<SessionMessage> =
            entries.iter().map(SessionMessage::from_value).collect();
        // LangFlow lists them by time already; a stable sort keeps that order on equal stamps.
        messages.sort_by(|a, b| a.timestamp.cmp(&b.timestamp));
        Ok(messages)
    }

    async fn send(
        &self,
        flow: &str,
        url: &Url,
        request: RequestBuilder,
    ) -> Result<Response, LangflowError> {
        let request = match self.api_key_header(flow)? {
            Some(key) => request.header("x-api-key", key),
            None => request,
        };
        request
            .send()
            .await
            .map_err(|err| LangflowError::Transport {
                flow: flow.into(),
                url: url.to_string(),
                detail: transport_detail(&err),
            })
    }

    /// The key as a header value marked sensitive, so hyper's HPACK encoder never indexes it
    /// and anything that prints headers shows it redacted.
    fn api_key_header(&self, flow: &str) -> Result<Option<HeaderValue>, LangflowError> {
        let Some(key) = &self.api_key else {
            return Ok(None);
        };
        let mut value = HeaderValue::from_str(key).map_err(|_| LangflowError::Decode {
            flow: flow.into(),
            // Never the key itself: only what is wrong with it.
            detail: "the configured API key is not a valid header value".into(),
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    fn url(&self, flow: &str, path: &str) -> Result<Url, LangflowError> {
        let mut base = self.base.clone();
        if !base.path().ends_with('/') {
            let with_slash = format!("{}/", base.path());
            base.set_path(&with_slash);
        }
        base.join(path).map_err(|err| LangflowError::Decode {
            flow: flow.into(),
            detail: err.to_string(),
        })
    }
}

fn check_session(flow: &str, sent: &str, answer: RunAnswer) -> Result<RunAnswer, LangflowError> {
    if answer.session_id.as_deref() == Some(sent) {
        Ok(answer)
    } else {
        Err(LangflowError::SessionMismatch {
            flow: flow.into(),
            sent: sent.into(),
            got: answer.session_id,
        })
    }
}

/// reqwest's message names the URL, never our headers; a timeout is said in so many words,
/// since reqwest's message for it does not.
fn transport_detail(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        format!("timed out: {err}")
    } else {
        err.to_string()
    }
}

async fn json_answer(flow: &str, url: &Url, response: Response) -> Result<Value, LangflowError> {
    let status = response.status();
    let body = response
        .text()
        .await
        .map_err(|err| LangflowError::Transport {
            flow: flow.into(),
            url: url.to_string(),
            detail: transport_detail(&err),
        })?;
    if !status.is_success() {
        return Err(error_from_status(flow, status.as_u16(), &body));
    }
    serde_json::from_str(&body).map_err(|err| LangflowError::Decode {
        flow: flow.into(),
        detail: err.to_string(),
    })
}

/// The start of a JSON value, for error messages.
fn short_json(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_key() {
        let client = LangflowClient::new(
            Url::parse("http://127.0.0.1:7860").unwrap(),
            Some("sk-very-secret".into()),
        );
        let shown = format!("{client:?}");
        assert!(!shown.contains("sk-very-secret"));
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn the_key_header_is_sensitive() {
        let client = LangflowClient::new(
            Url::parse("http://127.0.0.1:7860").unwrap(),
            Some("sk-very-secret".into()),
        );
        let value = client.api_key_header("f").unwrap().expect("a key is set");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("sk-very-secret"));
        let broken = LangflowClient::new(
            Url::parse("http://127.0.0.1:7860").unwrap(),
            Some("line\nbreak".into()),
        );
        let err = broken.api_key_header("f").unwrap_err().to_string();
        assert!(!err.contains("line"), "{err}");
    }

    #[test]
    fn request_omits_what_is_not_set() {
        let request = RunRequest {
            input_value: None,
            input_type: "chat".into(),
            output_type: "chat".into(),
            tweaks: Map::new(),
            session_id: "s1".into(),
        };
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({"input_type": "chat", "output_type": "chat", "session_id": "s1"})
        );
    }
}
