//! The `UiSession` actor: one per WebSocket connection at `/ws`.
//!
//! A session subscribes to the activity hub (all runs, or one) and forwards each event as a
//! JSON text frame; it also takes `submit` and `cancel` commands, so a canvas needs nothing
//! but this socket. Frames are parsed into a [`Command`] first, then each command has its
//! own method. A client that stops answering pings is dropped; one that reads too slowly
//! misses events (and is told how many) rather than making the daemon buffer without bound.

use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::Item;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use multiplex_actors::activity::{Delivery, Filter, Subscribe, Unsubscribe};
use multiplex_actors::cluster::{Cluster, ClusterError};
use multiplex_actors::store::RunRecord;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{debug, info};

use super::api::run_view;
use super::ApiError;
use crate::auth::{Caller, Role};

/// How often the server pings the client.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// A client silent for this long is gone.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Events queued for one client before it starts missing some.
const MAILBOX_CAPACITY: usize = 1024;
/// What a frame may hold beyond the largest REST body: the `submit` message around the
/// document (its `type` and `request_id`), with plenty to spare.
pub const FRAME_ROOM: usize = 64 * 1024;

/// Largest frame a client may send; a larger one closes the connection. At least the REST
/// body limit plus [`FRAME_ROOM`], so a document `POST /api/workflows` accepts is never
/// refused over the socket (with a 1 MiB limit for both, the wrapper tipped such documents
/// over).
#[derive(Debug, Clone, Copy)]
pub struct MaxFrame(pub usize);

impl MaxFrame {
    pub fn for_body_limit(max_body_bytes: usize) -> MaxFrame {
        MaxFrame(max_body_bytes.saturating_add(FRAME_ROOM))
    }
}

/// Upgrades `GET /ws` to a session. A viewer's session may subscribe; its `submit` and
/// `cancel` are answered with a `forbidden` error frame.
pub async fn connect(
    request: HttpRequest,
    stream: web::Payload,
    cluster: web::Data<Cluster>,
    caller: web::ReqData<Caller>,
    max_frame: web::Data<MaxFrame>,
) -> Result<HttpResponse, actix_web::Error> {
    let session = UiSession {
        cluster: cluster.get_ref().clone(),
        caller: caller.into_inner(),
        subscription: None,
        last_heard: Instant::now(),
        fragments: None,
        max_message: max_frame.0,
    };
    ws::WsResponseBuilder::new(session, &request, stream)
        .frame_size(max_frame.0)
        .start()
}

/// A message from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Command {
    Subscribe {
        #[serde(default)]
        run_id: Option<String>,
        #[serde(default)]
        since: Option<u64>,
    },
    Unsubscribe,
    Submit {
        workflow: Value,
        #[serde(default)]
        request_id: Option<Value>,
    },
    Cancel {
        run_id: String,
        #[serde(default)]
        request_id: Option<Value>,
    },
    Ping,
}

impl Command {
    /// The command's name when it changes the cluster, which takes an operator.
    fn operator_only(&self) -> Option<&'static str> {
        match self {
            Command::Submit { .. } => Some("submit"),
            Command::Cancel { .. } => Some("cancel"),
            Command::Subscribe { .. } | Command::Unsubscribe | Command::Ping => None,
        }
    }

    fn parse(text: &str) -> Result<Command, String> {
        serde_json::from_str(text).map_err(|err| {
            format!(
                "cannot read the message ({err}); expected an object with \"type\" one of \
                 subscribe, unsubscribe, submit, cancel, ping"
            )
        })
    }
}

/// One connected UI client.
pub struct UiSession {
    cluster: Cluster,
    /// Whom the upgrade request was authenticated as; decides submit and cancel.
    caller: Caller,
    /// The hub's id for our subscription, once subscribed.
    subscription: Option<u64>,
    last_heard: Instant,
    /// A message arriving in fragments (a first frame and continuations), until its last.
    fragments: Option<Fragments>,
    /// Largest message, whole or reassembled, the client may send.
    max_message: usize,
}

/// The frames of one fragmented message so far.
struct Fragments {
    text: bool,
    bytes: bytes::BytesMut,
}

impl UiSession {
    fn send_json(ctx: &mut ws::WebsocketContext<Self>, value: &Value) {
        ctx.text(value.to_string());
    }

    fn run_command(&mut self, command: Command, ctx: &mut ws::WebsocketContext<Self>) {
        if let Some(name) = command.operator_only() {
            if !self.caller.may(Role::Operator) {
                let request_id = match command {
                    Command::Submit { request_id, .. } | Command::Cancel { request_id, .. } => {
                        request_id
                    }
                    _ => None,
                };
                Self::send_json(ctx, &self.forbidden(name, request_id));
                return;
            }
        }
        match command {
            Command::Subscribe { run_id, since } => self.subscribe(run_id, since, ctx),
            Command::Unsubscribe => self.unsubscribe(),
            Command::Submit {
                workflow,
                request_id,
            } => self.submit(workflow, request_id, ctx),
            Command::Cancel { run_id, request_id } => self.cancel(run_id, request_id, ctx),
            Command::Ping => Self::send_json(ctx, &json!({ "type": "pong" })),
        }
    }

    /// The error frame for a command this session's role may not send.
    fn forbidden(&self, what: &str, request_id: Option<Value>) -> Value {
        let message = format!(
            "{what} needs the {} role; this connection's token has the {} role",
            Role::Operator,
            self.caller.role
        );
        debug!(token = ?self.caller.token, command = what, "ui session command refused");
        json!({ "type": "error", "request_id": request_id, "error": "forbidden",
                "message": message })
    }

    fn subscribe(
        &mut self,
        run_id: Option<String>,
        since: Option<u64>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        self.unsubscribe();
        let filter = match &run_id {
            Some(id) => Filter::Run(id.clone()),
            None => Filter::All,
        };
        let subscribe = Subscribe {
            recipient: ctx.address().recipient(),
            filter,
            replay_after: since,
        };
        let hub = self.cluster.hub().clone();
        // `wait`: events replayed by the hub must not overtake the `subscribed` reply.
        ctx.wait(
            hub.send(subscribe)
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(id) => {
                        act.subscription = Some(id);
                        Self::send_json(ctx, &json!({ "type": "subscribed", "run_id": run_id }));
                    }
                    Err(_) => {
                        let message = "the activity hub is not running";
                        let reply =
                            json!({ "type": "error", "error": "internal", "message": message });
                        Self::send_json(ctx, &reply);
                    }
                }),
        );
    }

    fn unsubscribe(&mut self) {
        if let Some(id) = self.subscription.take() {
            self.cluster.hub().do_send(Unsubscribe(id));
        }
    }

    fn submit(
        &mut self,
        workflow: Value,
        request_id: Option<Value>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let cluster = self.cluster.clone();
        let work = async move { cluster.submit(workflow).await };
        self.reply_with_run(work, "submitted", request_id, ctx);
    }

    fn cancel(
        &mut self,
        run_id: String,
        request_id: Option<Value>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let cluster = self.cluster.clone();
        let work = async move { cluster.cancel(&run_id).await };
        self.reply_with_run(work, "cancelled", request_id, ctx);
    }

    /// Runs a cluster request off the mailbox (`spawn`: events keep flowing meanwhile) and
    /// answers with the run as `reply_type`, or with the error REST would give.
    fn reply_with_run<F>(
        &mut self,
        work: F,
        reply_type: &'static str,
        request_id: Option<Value>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) where
        F: std::future::Future<Output = Result<RunRecord, ClusterError>> + 'static,
    {
        ctx.spawn(work.into_actor(self).map(move |result, _act, ctx| {
            let reply = match result {
                Ok(record) => json!({
                    "type": reply_type,
                    "request_id": request_id,
                    "run": run_view(&record),
                }),
                Err(err) => error_reply(err, request_id),
            };
            Self::send_json(ctx, &reply);
        }));
    }
}

/// The same code and message the REST API would give.
fn error_reply(err: ClusterError, request_id: Option<Value>) -> Value {
    let api = ApiError::from(err);
    let mut reply = json!({
        "type": "error",
        "request_id": request_id,
        "error": api.code(),
        "message": api.to_string(),
    });
    if let ApiError::Invalid(issues) = &api {
        reply["issues"] = json!(issues);
    }
    reply
}

impl Actor for UiSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        debug!("ui session connected");
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        ctx.run_interval(HEARTBEAT_INTERVAL, |act, ctx| {
            if act.last_heard.elapsed() > CLIENT_TIMEOUT {
                info!("ui session timed out");
                ctx.stop();
                return;
            }
            ctx.ping(b"");
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.unsubscribe();
        debug!("ui session closed");
    }
}

impl Handler<Delivery> for UiSession {
    type Result = ();

    fn handle(&mut self, delivery: Delivery, ctx: &mut Self::Context) {
        match delivery {
            Delivery::Event(event) => match serde_json::to_string(&*event) {
                Ok(text) => ctx.text(text),
                Err(err) => debug!(error = %err, "event not serializable"),
            },
            Delivery::Missed(count) => {
                Self::send_json(ctx, &json!({ "type": "missed", "count": count }))
            }
        }
    }
}

impl UiSession {
    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        match Command::parse(text) {
            Ok(command) => self.run_command(command, ctx),
            Err(message) => Self::send_json(
                ctx,
                &json!({ "type": "error", "error": "bad_request", "message": message }),
            ),
        }
    }

    fn refuse_binary(ctx: &mut ws::WebsocketContext<Self>) {
        Self::send_json(
            ctx,
            &json!({ "type": "error", "error": "bad_request",
                      "message": "binary frames are not understood; send JSON text" }),
        );
    }

    /// Reassembles a message sent in fragments (clients and proxies may split any message)
    /// and handles it once its last fragment is in. One that grows past the message limit
    /// closes the socket with 1009, as an unfragmented one that large would.
    fn on_fragment(&mut self, item: Item, ctx: &mut ws::WebsocketContext<Self>) {
        let (first, part, last) = match item {
            Item::FirstText(part) => (Some(true), part, false),
            Item::FirstBinary(part) => (Some(false), part, false),
            Item::Continue(part) => (None, part, false),
            Item::Last(part) => (None, part, true),
        };
        if let Some(text) = first {
            self.fragments = Some(Fragments {
                text,
                bytes: bytes::BytesMut::new(),
            });
        }
        let Some(fragments) = self.fragments.as_mut() else {
            info!("ui session sent a continuation without a first fragment");
            ctx.close(Some(ws::CloseCode::Protocol.into()));
            ctx.stop();
            return;
        };
        if fragments.bytes.len() + part.len() > self.max_message {
            info!(limit = self.max_message, "ui session message too large");
            ctx.close(Some(ws::CloseCode::Size.into()));
            ctx.stop();
            return;
        }
        fragments.bytes.extend_from_slice(&part);
        if !last {
            return;
        }
        let Some(Fragments { text, bytes }) = self.fragments.take() else {
            return;
        };
        match (text, std::str::from_utf8(&bytes)) {
            (true, Ok(text)) => self.on_text(text, ctx),
            (true, Err(_)) => Self::send_json(
                ctx,
                &json!({ "type": "error", "error": "bad_request",
                          "message": "the text message is not UTF-8" }),
            ),
            (false, _) => Self::refuse_binary(ctx),
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for UiSession {
    fn handle(&mut self, message: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        match message {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Ping(bytes)) => ctx.pong(&bytes),
            Ok(ws::Message::Pong(_)) => {}
            Ok(ws::Message::Binary(_)) => Self::refuse_binary(ctx),
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Continuation(item)) => self.on_fragment(item, ctx),
            Ok(ws::Message::Nop) => {}
            Err(err) => {
                info!(error = %err, "ui session protocol error");
                ctx.stop();
            }
        }
    }
}
