//! `multiplex mcp`: the MCP server over stdio, for clients that spawn their servers.
//!
//! It holds no MCP logic of its own: each JSON-RPC line read from stdin is POSTed to a
//! running daemon's `/mcp`, and every message the daemon answers (a JSON body, or each
//! event of an SSE stream, progress notifications included) is written to stdout as one
//! line. The session id from `initialize` and the negotiated protocol version go on every
//! later request; for the 2026-07-28 revision, whose requests carry their version in
//! `_meta`, the `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers are derived from
//! each message. Once a session exists, the daemon's standalone SSE stream (resource update
//! notifications) is relayed too. So a client sees exactly what an HTTP client of the same
//! daemon sees.
//!
//! Requests are relayed concurrently (a `submit_workflow` that follows its run does not hold
//! up a status poll); one writer task owns stdout so lines never interleave. stdout carries
//! only protocol messages; logs go to stderr.
//!
//! The bearer token (`MULTIPLEX_TOKEN`, or the variable `--token-env` names) goes on every
//! request, so the daemon checks the same role as for an HTTP client.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use url::Url;

use crate::client::{Credential, TOKEN_ENV};

/// Messages waiting for stdout before readers of the daemon wait.
const OUT_CAPACITY: usize = 256;

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0} is not a usable daemon URL: {1}")]
    Url(Url, url::ParseError),
    #[error("cannot read stdin or write stdout: {0}")]
    Io(#[from] std::io::Error),
}

/// Session state learned from the daemon's answers.
#[derive(Default)]
struct Session {
    id: Option<String>,
    protocol_version: Option<String>,
    listening: bool,
}

#[derive(Clone)]
struct Relay {
    http: reqwest::Client,
    endpoint: Url,
    session: Arc<Mutex<Session>>,
    out: mpsc::Sender<String>,
    /// Sent as `Authorization: Bearer` on every request.
    credential: Option<Credential>,
}

/// Relays stdin to the daemon at `daemon` until stdin closes, with `credential` as the
/// bearer token when there is one.
pub async fn run(daemon: &Url, credential: Option<Credential>) -> Result<(), RelayError> {
    let endpoint = daemon
        .join(super::PATH.trim_start_matches('/'))
        .map_err(|err| RelayError::Url(daemon.clone(), err))?;
    let (out, mut lines_out) = mpsc::channel::<String>(OUT_CAPACITY);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = lines_out.recv().await {
            let written = async {
                stdout.write_all(line.as_bytes()).await?;
                stdout.write_all(b"\n").await?;
                stdout.flush().await
            };
            if let Err(err) = written.await {
                warn!(error = %err, "stdout closed; MCP relay stops writing");
                return;
            }
        }
    });
    let relay = Relay {
        http: reqwest::Client::new(),
        endpoint,
        session: Arc::default(),
        out,
        credential,
    };
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut in_flight = tokio::task::JoinSet::new();
    while let Some(line) = stdin.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let message: Value = match serde_json::from_str(&line) {
            Ok(message) => message,
            Err(err) => {
                let error = json!({"jsonrpc": "2.0", "id": null,
                    "error": {"code": -32700, "message": format!("Parse error: {err}")}});
                relay.emit(error.to_string()).await;
                continue;
            }
        };
        // The handshake sets the session every later message needs: relay it first.
        if message.get("method").and_then(Value::as_str) == Some("initialize") {
            relay.forward(message).await;
        } else {
            let relay = relay.clone();
            in_flight.spawn(async move { relay.forward(message).await });
        }
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    relay.close().await;
    drop(relay);
    let _ = writer.await;
    Ok(())
}

impl Relay {
    async fn emit(&self, line: String) {
        // The writer ends only when stdout is gone; then nothing is left to do with it.
        let _ = self.out.send(line).await;
    }

    fn headers(&self, message: &Value) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(credential) = &self.credential {
            let bearer = format!("Bearer {}", credential.secret());
            if let Ok(mut value) = HeaderValue::from_str(&bearer) {
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
        }
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let params = message.get("params");
        let meta_version = params
            .and_then(|params| params.get("_meta"))
            .and_then(|meta| meta.get("io.modelcontextprotocol/protocolVersion"))
            .and_then(Value::as_str);
        let version = meta_version.or(session.protocol_version.as_deref());
        let mut set = |name: &'static str, value: Option<&str>| {
            if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(name, value);
            }
        };
        set("mcp-session-id", session.id.as_deref());
        set("mcp-protocol-version", version);
        if meta_version.is_some() {
            set("mcp-method", message.get("method").and_then(Value::as_str));
            let name = params
                .and_then(|params| params.get("name").or_else(|| params.get("uri")))
                .and_then(Value::as_str);
            set("mcp-name", name);
        }
        headers
    }

    /// POSTs one message and relays whatever comes back.
    async fn forward(&self, message: Value) {
        let id = message.get("id").cloned();
        let initialize = message.get("method").and_then(Value::as_str) == Some("initialize");
        let initialized =
            message.get("method").and_then(Value::as_str) == Some("notifications/initialized");
        let response = self
            .http
            .post(self.endpoint.clone())
            .headers(self.headers(&message))
            .body(message.to_string())
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(err) => {
                self.fail(
                    id,
                    format!("cannot reach the daemon at {}: {err}", self.endpoint),
                )
                .await;
                return;
            }
        };
        let status = response.status();
        if initialize {
            if let Some(session) = response.headers().get("mcp-session-id") {
                let mut state = self.session.lock().unwrap_or_else(|p| p.into_inner());
                state.id = session.to_str().ok().map(str::to_string);
            }
        }
        let sse = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("text/event-stream"));
        if sse {
            let relayed = self.relay_events(response, initialize).await;
            if !relayed && id.is_some() {
                self.fail(
                    id,
                    "the daemon's event stream ended without an answer".into(),
                )
                .await;
            }
        } else {
            let body = response.text().await.unwrap_or_default();
            match serde_json::from_str::<Value>(&body) {
                Ok(value) if value.get("jsonrpc").is_some() => {
                    if initialize {
                        self.learn_version(&value);
                    }
                    self.emit(value.to_string()).await;
                }
                _ if status.is_success() => {}
                _ if id.is_some() && matches!(status.as_u16(), 401 | 403) => {
                    let hint = match &self.credential {
                        Some(credential) => format!("check the token in {}", credential.source),
                        None => format!("set {TOKEN_ENV} to a token of this daemon"),
                    };
                    let message = format!("the daemon answered {status}: {}; {hint}", body.trim());
                    self.fail(id, message).await
                }
                _ if id.is_some() => {
                    self.fail(id, format!("the daemon answered {status}: {}", body.trim()))
                        .await
                }
                _ => warn!(%status, body = %body.trim(), "the daemon refused a notification"),
            }
        }
        if initialized && status.is_success() {
            self.listen();
        }
    }

    fn learn_version(&self, answer: &Value) {
        if let Some(version) = answer
            .pointer("/result/protocolVersion")
            .and_then(Value::as_str)
        {
            let mut state = self.session.lock().unwrap_or_else(|p| p.into_inner());
            state.protocol_version = Some(version.to_string());
        }
    }

    /// Relays each event of an SSE body; answers whether any message went through.
    async fn relay_events(&self, response: reqwest::Response, initialize: bool) -> bool {
        let mut parser = SseParser::default();
        let mut stream = response.bytes_stream();
        let mut any = false;
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            for data in parser.push(&chunk) {
                let Ok(value) = serde_json::from_str::<Value>(&data) else {
                    continue;
                };
                if initialize {
                    self.learn_version(&value);
                }
                any = true;
                self.emit(value.to_string()).await;
            }
        }
        any
    }

    /// Opens the session's standalone stream, once, in the background.
    fn listen(&self) {
        {
            let mut state = self.session.lock().unwrap_or_else(|p| p.into_inner());
            if state.id.is_none() || state.listening {
                return;
            }
            state.listening = true;
        }
        let relay = self.clone();
        tokio::spawn(async move {
            let mut headers = relay.headers(&Value::Null);
            headers.remove(CONTENT_TYPE);
            headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
            match relay
                .http
                .get(relay.endpoint.clone())
                .headers(headers)
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => {
                    relay.relay_events(response, false).await;
                }
                Ok(response) => debug!(status = %response.status(), "no standalone stream"),
                Err(err) => debug!(error = %err, "standalone stream failed"),
            }
        });
    }

    /// Ends the session on the daemon, as HTTP clients do when they close.
    async fn close(&self) {
        let id = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .clone();
        if id.is_some() {
            let headers = self.headers(&Value::Null);
            let _ = self
                .http
                .delete(self.endpoint.clone())
                .headers(headers)
                .send()
                .await;
        }
    }

    /// Answers a request the daemon could not answer with a JSON-RPC error of our own.
    async fn fail(&self, id: Option<Value>, message: String) {
        warn!(%message, "MCP relay error");
        if let Some(id) = id {
            let error = json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": -32603, "message": message}});
            self.emit(error.to_string()).await;
        }
    }
}

/// Splits an SSE byte stream into the data of each event.
#[derive(Default)]
struct SseParser {
    /// Bytes, not text: a chunk may end inside a UTF-8 sequence. Carriage returns are
    /// dropped (JSON data never holds a raw one), so `\r\n` endings look like `\n`.
    buffer: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buffer
            .extend(chunk.iter().filter(|byte| **byte != b'\r'));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\n\n") {
            let bytes: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&bytes);
            let data: Vec<&str> = block
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            if !data.is_empty() && data.iter().any(|line| !line.is_empty()) {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::SseParser;

    #[test]
    fn sse_events_split_across_chunks() {
        let mut parser = SseParser::default();
        assert!(parser
            .push(b"id: 0\nretry: 3000\ndata:\n\nevent: message\nda")
            .is_empty());
        let events = parser.push(b"ta: {\"a\":1}\r\n\r\ndata: {\"b\":2}\n\n");
        assert_eq!(
            events,
            vec![r#"{"a":1}"#.to_string(), r#"{"b":2}"#.to_string()]
        );
    }
}
