//! The ComfyUI event socket (`/ws?clientId=...`).
//!
//! Lifecycle events reach only the socket whose client id submitted the prompt, so a node
//! connects once with its own client id, waits for the first `status` frame (the server has
//! registered the id by then) and only then submits.
//!
//! This uses awc, whose client is not `Send`: the socket and the returned [`EventStream`] live
//! on the arbiter that opened them, which is the node actor's. Jobs on other threads get the
//! events through the node's broadcast channel, never the stream itself.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_codec::Framed;
use actix_http::ws::Item;
use awc::ws::{Codec, Frame, Message};
use awc::BoxedSocket;
use bytes::{Bytes, BytesMut};
use futures_util::stream::LocalBoxStream;
use futures_util::{SinkExt, Stream, StreamExt};
use tracing::{debug, trace};
use url::Url;

use super::events::{parse_binary, parse_text, ComfyEvent};
use super::ComfyError;

/// Largest frame (or reassembled message) accepted from ComfyUI. actix's default of 64 KiB is
/// far below a single preview: a 1024x576 JPEG latent preview alone is 60-200 KiB, and
/// `SaveImageWebsocket` pushes whole PNG outputs (several MiB at 1024x1024) as binary frames.
/// 32 MiB covers those with room while still bounding what a misbehaving peer can make us buffer.
pub const MAX_FRAME_SIZE: usize = 32 * 1024 * 1024;

/// How long the WebSocket handshake plus the first `status` frame may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// After this long without a frame from the server, the socket sends a ping...
pub const PING_AFTER: Duration = Duration::from_secs(20);
/// ...and calls the socket dead when nothing at all (a pong or any frame) follows within this.
/// ComfyUI (aiohttp) answers pings on its own. Without this, a half-open socket (a NAT or
/// tunnel that dropped the connection silently) would look open forever on an idle node, and
/// the prompts posted to it would have their events sent to a client that is not there.
pub const PONG_TIMEOUT: Duration = Duration::from_secs(10);

/// Announces that we understand binary type 4 previews, which name their prompt and node
/// (servers that do not know the message ignore it).
const FEATURE_FLAGS: &str = r#"{"type":"feature_flags","data":{"supports_preview_metadata":true}}"#;

/// The events of one ComfyUI socket, starting with the first `status` frame (the one with
/// `sid`, which [`run_job`](super::run_job) reads as "the socket reconnected").
///
/// Yields `Err` once when the socket fails or closes (for a node, a closed ComfyUI socket is
/// always worth reconnecting), then ends. Not `Send`: see the module doc.
pub struct EventStream {
    sid: Option<String>,
    queue_remaining: Option<u64>,
    inner: LocalBoxStream<'static, Result<ComfyEvent, ComfyError>>,
}

impl EventStream {
    /// The session id the server confirmed in its first `status` frame.
    pub fn sid(&self) -> Option<&str> {
        self.sid.as_deref()
    }

    /// The queue length reported in the first `status` frame.
    pub fn queue_remaining(&self) -> Option<u64> {
        self.queue_remaining
    }
}

impl Stream for EventStream {
    type Item = Result<ComfyEvent, ComfyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("sid", &self.sid)
            .finish_non_exhaustive()
    }
}

/// Connects to `base`'s `/ws?clientId=client_id` (no Origin header) and returns once the
/// server's first `status` frame has arrived, so the caller may submit right away.
pub async fn connect_events(base: &Url, client_id: &str) -> Result<EventStream, ComfyError> {
    let url = ws_url(base, client_id)?;
    let ws_error = |detail: String| ComfyError::WebSocket {
        url: url.to_string(),
        detail,
    };
    let client = awc::Client::builder().timeout(HANDSHAKE_TIMEOUT).finish();

    let handshake = async {
        let (_, framed) = client
            .ws(url.as_str())
            .max_frame_size(MAX_FRAME_SIZE)
            .connect()
            .await
            .map_err(|err| match err {
                awc::error::WsClientError::InvalidResponseStatus(status) => {
                    ComfyError::UpgradeRefused {
                        url: url.to_string(),
                        status: status.as_u16(),
                    }
                }
                other => ws_error(other.to_string()),
            })?;
        let mut reader = FrameReader {
            framed,
            partial: None,
            done: false,
            url: url.to_string(),
            deadline: tokio::time::Instant::now() + PING_AFTER,
            pinged: false,
        };
        reader
            .framed
            .send(Message::Text(FEATURE_FLAGS.into()))
            .await
            .map_err(|err| ws_error(err.to_string()))?;
        loop {
            match reader.next_event().await {
                Some(Ok(ComfyEvent::Status {
                    queue_remaining,
                    sid,
                })) => {
                    return Ok((reader, queue_remaining, sid));
                }
                Some(Ok(other)) => trace!(event = ?other, "event before the first status"),
                Some(Err(err)) => return Err(err),
                None => return Err(ws_error("closed before the first status".into())),
            }
        }
    };
    let (reader, queue_remaining, sid) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| {
            ws_error(format!(
                "timed out after {HANDSHAKE_TIMEOUT:?} waiting for the first status frame"
            ))
        })??;
    debug!(url = %url, sid = ?sid, "ComfyUI socket connected");

    // The first status is yielded too: it is the only one carrying `sid`, so whoever reads the
    // events can tell a (re)connection happened and events may have been missed.
    let first = ComfyEvent::Status {
        queue_remaining,
        sid: sid.clone(),
    };
    let rest = futures_util::stream::unfold(reader, |mut reader| async move {
        let item = reader.next_event().await?;
        Some((item, reader))
    });
    let inner = futures_util::stream::once(async move { Ok(first) })
        .chain(rest)
        .boxed_local();
    Ok(EventStream {
        sid,
        queue_remaining,
        inner,
    })
}

/// `http://host:8188/prefix` -> `ws://host:8188/prefix/ws?clientId=...`.
pub fn ws_url(base: &Url, client_id: &str) -> Result<Url, ComfyError> {
    let mut url = super::client::join(base, "ws")?;
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    url.set_scheme(scheme).map_err(|()| ComfyError::WebSocket {
        url: base.to_string(),
        detail: "cannot derive a WebSocket URL".into(),
    })?;
    url.query_pairs_mut()
        .clear()
        .append_pair("clientId", client_id);
    Ok(url)
}

/// Reads frames, answers pings, pings a quiet server, and reassembles fragmented messages.
struct FrameReader {
    framed: Framed<BoxedSocket, Codec>,
    /// A fragmented message being reassembled: whether it is text, and its bytes so far.
    partial: Option<(bool, BytesMut)>,
    done: bool,
    url: String,
    /// When to ping (or, once pinged, to give up) if no frame arrives before.
    deadline: tokio::time::Instant,
    /// A ping is out and nothing has been heard since.
    pinged: bool,
}

impl FrameReader {
    async fn next_event(&mut self) -> Option<Result<ComfyEvent, ComfyError>> {
        if self.done {
            return None;
        }
        loop {
            // `next()` is cancel-safe: a frame half read when the timer fires stays buffered.
            let next = tokio::select! {
                next = self.framed.next() => Some(next),
                () = tokio::time::sleep_until(self.deadline) => None,
            };
            let Some(next) = next else {
                if self.pinged {
                    return self.fail(format!(
                        "timed out: no answer to a ping in {PONG_TIMEOUT:?}"
                    ));
                }
                trace!(url = %self.url, "socket quiet; pinging");
                if let Err(err) = self.framed.send(Message::Ping(Bytes::new())).await {
                    return self.fail(err.to_string());
                }
                self.pinged = true;
                self.deadline = tokio::time::Instant::now() + PONG_TIMEOUT;
                continue;
            };
            self.pinged = false;
            self.deadline = tokio::time::Instant::now() + PING_AFTER;
            let frame = match next {
                Some(Ok(frame)) => frame,
                Some(Err(err)) => return self.fail(err.to_string()),
                None => return self.fail("connection ended".into()),
            };
            match frame {
                Frame::Text(bytes) => return Some(Ok(text_event(&bytes))),
                Frame::Binary(bytes) => return Some(Ok(parse_binary(bytes))),
                Frame::Continuation(item) => {
                    if let Some(event) = self.continuation(item) {
                        return Some(event);
                    }
                }
                Frame::Ping(payload) => {
                    if let Err(err) = self.framed.send(Message::Pong(payload)).await {
                        return self.fail(err.to_string());
                    }
                }
                Frame::Pong(_) => {}
                Frame::Close(reason) => {
                    let detail = format!("closed by the server: {reason:?}");
                    return self.fail(detail);
                }
            }
        }
    }

    /// Adds a fragment; returns the event once the message is complete (or an error).
    fn continuation(&mut self, item: Item) -> Option<Result<ComfyEvent, ComfyError>> {
        let (chunk, last) = match item {
            Item::FirstText(chunk) => {
                self.partial = Some((true, BytesMut::new()));
                (chunk, false)
            }
            Item::FirstBinary(chunk) => {
                self.partial = Some((false, BytesMut::new()));
                (chunk, false)
            }
            Item::Continue(chunk) => (chunk, false),
            Item::Last(chunk) => (chunk, true),
        };
        let Some((_, buffer)) = self.partial.as_mut() else {
            return Some(Ok(ComfyEvent::Unknown {
                kind: "stray-continuation".into(),
            }));
        };
        if buffer.len() + chunk.len() > MAX_FRAME_SIZE {
            return self.fail(format!("fragmented message exceeds {MAX_FRAME_SIZE} bytes"));
        }
        buffer.extend_from_slice(&chunk);
        if !last {
            return None;
        }
        let (is_text, buffer) = self.partial.take()?;
        let bytes = buffer.freeze();
        Some(Ok(if is_text {
            text_event(&bytes)
        } else {
            parse_binary(bytes)
        }))
    }

    fn fail(&mut self, detail: String) -> Option<Result<ComfyEvent, ComfyError>> {
        self.done = true;
        Some(Err(ComfyError::WebSocket {
            url: self.url.clone(),
            detail,
        }))
    }
}

fn text_event(bytes: &Bytes) -> ComfyEvent {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_text(text),
        Err(_) => ComfyEvent::Unknown {
            kind: "invalid-utf8".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url_from_http_base() {
        let base = Url::parse("http://127.0.0.1:8188").unwrap();
        assert_eq!(
            ws_url(&base, "abc").unwrap().as_str(),
            "ws://127.0.0.1:8188/ws?clientId=abc"
        );
        let tls = Url::parse("https://gpu.example/comfy/").unwrap();
        assert_eq!(
            ws_url(&tls, "a b").unwrap().as_str(),
            "wss://gpu.example/comfy/ws?clientId=a+b"
        );
    }
}
