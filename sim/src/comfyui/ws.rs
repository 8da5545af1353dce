//! `/ws`: one actor per connection, and the hub the worker sends through.
//!
//! The hub maps client ids to sessions. A reconnect with the same client id
//! replaces the old entry, as ComfyUI does; lifecycle events then reach the
//! new socket. While the `stall` switch is on, the hub swallows every frame.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use actix::{Actor, ActorContext, Addr, AsyncContext, Handler, Message, StreamHandler};
use actix_web_actors::ws;
use bytes::Bytes;
use serde_json::{json, Value};

use super::state::{status_frame, Shared};

/// Something to write to a socket.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub(crate) enum Frame {
    Text(String),
    Binary(Bytes),
    Close,
}

struct Entry {
    session: u64,
    addr: Addr<Session>,
    preview_metadata: Arc<AtomicBool>,
}

/// Routes frames to the sessions of client ids.
pub(crate) struct Hub {
    sessions: Mutex<HashMap<String, Entry>>,
    next_session: AtomicU64,
    stall: AtomicBool,
}

impl Hub {
    pub fn new(stall: bool) -> Hub {
        Hub {
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            stall: AtomicBool::new(stall),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_stall(&self, stall: bool) {
        self.stall.store(stall, Ordering::Relaxed);
    }

    fn register(&self, client_id: &str, addr: Addr<Session>, metadata: Arc<AtomicBool>) -> u64 {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            session,
            addr,
            preview_metadata: metadata,
        };
        self.sessions().insert(client_id.to_owned(), entry);
        session
    }

    fn unregister(&self, client_id: &str, session: u64) {
        let mut sessions = self.sessions();
        if sessions
            .get(client_id)
            .is_some_and(|e| e.session == session)
        {
            sessions.remove(client_id);
        }
    }

    /// Sends to one client id (dropped if it has no socket or while stalled).
    pub fn send(&self, client_id: &str, frame: Frame) {
        if self.stall.load(Ordering::Relaxed) {
            return;
        }
        if let Some(entry) = self.sessions().get(client_id) {
            entry.addr.do_send(frame);
        }
    }

    pub fn broadcast(&self, text: &str) {
        if self.stall.load(Ordering::Relaxed) {
            return;
        }
        for entry in self.sessions().values() {
            entry.addr.do_send(Frame::Text(text.to_owned()));
        }
    }

    /// Whether this client asked for type-4 previews (`feature_flags`).
    pub fn wants_metadata(&self, client_id: &str) -> bool {
        self.sessions()
            .get(client_id)
            .is_some_and(|e| e.preview_metadata.load(Ordering::Relaxed))
    }

    pub fn close(&self, client_id: &str) {
        if let Some(entry) = self.sessions().remove(client_id) {
            entry.addr.do_send(Frame::Close);
        }
    }

    pub fn close_all(&self) {
        for (_, entry) in self.sessions().drain() {
            entry.addr.do_send(Frame::Close);
        }
    }
}

/// One WebSocket connection.
pub(crate) struct Session {
    pub client_id: String,
    pub shared: Arc<Shared>,
    pub session: u64,
    pub preview_metadata: Arc<AtomicBool>,
}

impl Session {
    /// Handles `{"type": "feature_flags", ...}`, the only message clients
    /// send; everything else is ignored like ComfyUI does.
    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if message["type"] != "feature_flags" {
            return;
        }
        let wants = message["data"]["supports_preview_metadata"]
            .as_bool()
            .unwrap_or(false);
        self.preview_metadata.store(wants, Ordering::Relaxed);
        let reply = json!({"type": "feature_flags", "data":
            {"supports_preview_metadata": true, "max_upload_size": 104_857_600}});
        ctx.text(reply.to_string());
    }
}

impl Actor for Session {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let hub = &self.shared.hub;
        self.session = hub.register(
            &self.client_id,
            ctx.address(),
            self.preview_metadata.clone(),
        );
        let (remaining, current) = {
            let state = self.shared.state();
            let current = state.running.as_ref().and_then(|r| {
                let ours = r.item.client_id() == Some(self.client_id.as_str());
                r.node.clone().filter(|_| ours)
            });
            (state.queue_remaining(), current)
        };
        tracing::debug!(client_id = %self.client_id, "websocket connected");
        ctx.text(status_frame(remaining, Some(&self.client_id)));
        // A reconnecting submitter learns which node is running.
        if let Some(node) = current {
            ctx.text(json!({"type": "executing", "data": {"node": node}}).to_string());
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        tracing::debug!(client_id = %self.client_id, "websocket closed");
        self.shared.hub.unregister(&self.client_id, self.session);
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match msg {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Err(_) => ctx.stop(),
            Ok(_) => {}
        }
    }
}

impl Handler<Frame> for Session {
    type Result = ();

    fn handle(&mut self, frame: Frame, ctx: &mut Self::Context) {
        match frame {
            Frame::Text(text) => ctx.text(text),
            Frame::Binary(bytes) => ctx.binary(bytes),
            Frame::Close => {
                ctx.close(None);
                ctx.stop();
            }
        }
    }
}
