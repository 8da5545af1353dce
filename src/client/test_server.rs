//! A stand-in daemon for the client's tests: real actix-web on a real socket (port 0),
//! speaking the REST and WebSocket contract of docs/api.md, driven by a script.
//!
//! REST run views come from a queue: each `GET /api/workflows/{id}` takes the next view and
//! the last one stays, so a test can say "the first fetches see this, later ones that". Each
//! WebSocket connection takes the next script; the script runs when the client subscribes,
//! which makes the event order deterministic without any sleeps.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use actix::{Actor, ActorContext as _, StreamHandler};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_web_actors::ws;
use serde_json::{json, Value};
use url::Url;

/// What the fake daemon does on one WebSocket connection once the client subscribes.
#[derive(Clone, Debug)]
pub enum Action {
    /// Send this JSON as a text frame.
    Send(Value),
    /// Replace the queue of REST run views.
    SetRuns(Vec<Value>),
    /// Drop the connection without a close frame, like a crashed daemon or a cut tunnel.
    Drop,
}

/// The fake daemon's scripted and recorded state.
#[derive(Debug, Default)]
pub struct State {
    /// Run views answered in turn by `GET /api/workflows/{id}`; empty means 404.
    pub runs: VecDeque<Value>,
    /// How many of the next `GET /api/workflows/{id}` are cut off mid-answer (the status
    /// line goes out, then the connection drops), like a daemon killed while answering.
    pub cut_runs: usize,
    /// One script per WebSocket connection, in order; none left means `/ws` answers 404.
    pub sockets: VecDeque<Vec<Action>>,
    /// Status and body answered by `POST /api/workflows`.
    pub submit_answer: Option<(u16, Value)>,
    /// Answers of `GET /api/workflows` and `GET /api/nodes`.
    pub list: Value,
    pub nodes: Value,
    /// Every `subscribe` frame received, in order.
    pub subscribes: Vec<Value>,
    /// The query strings and paths of requests, for asserting on URLs.
    pub requests: Vec<String>,
}

/// A running fake daemon; stops with the test's actix system.
pub struct TestServer {
    pub base: Url,
    pub state: Arc<Mutex<State>>,
}

impl TestServer {
    pub fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A test that panicked while holding the lock has already failed; keep going.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts the fake daemon on 127.0.0.1 with a free port.
pub fn start(state: State) -> TestServer {
    let state = Arc::new(Mutex::new(state));
    let shared = web::Data::from(state.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(shared.clone())
            .route("/api/workflows", web::post().to(submit))
            .route("/api/workflows", web::get().to(list))
            .route("/api/workflows/{id}", web::get().to(run))
            .route("/api/workflows/{id}/cancel", web::post().to(cancel))
            .route("/api/nodes", web::get().to(nodes))
            .route("/ws", web::get().to(socket))
    })
    .workers(1)
    .disable_signals()
    // `Action::Drop` ends the response stream; by default the server then waits up to a
    // second for the client to hang up. A crashed daemon would not wait at all.
    .client_disconnect_timeout(std::time::Duration::from_millis(1))
    .bind(("127.0.0.1", 0))
    .expect("binding port 0 on loopback should succeed");
    let addr = server.addrs()[0];
    actix_rt::spawn(server.run());
    let base = Url::parse(&format!("http://{addr}")).expect("a socket address makes a URL");
    TestServer { base, state }
}

fn record(state: &Mutex<State>, req: &HttpRequest) {
    let line = format!("{} {}", req.method(), req.uri());
    lock(state).requests.push(line);
}

async fn submit(state: web::Data<Mutex<State>>, req: HttpRequest) -> HttpResponse {
    record(&state, &req);
    let (status, body) = lock(&state)
        .submit_answer
        .clone()
        .unwrap_or((201, json!({})));
    let status = actix_web::http::StatusCode::from_u16(status).expect("scripted status");
    HttpResponse::build(status).json(body)
}

async fn list(state: web::Data<Mutex<State>>, req: HttpRequest) -> HttpResponse {
    record(&state, &req);
    HttpResponse::Ok().json(lock(&state).list.clone())
}

async fn nodes(state: web::Data<Mutex<State>>, req: HttpRequest) -> HttpResponse {
    record(&state, &req);
    HttpResponse::Ok().json(lock(&state).nodes.clone())
}

async fn run(state: web::Data<Mutex<State>>, req: HttpRequest) -> HttpResponse {
    record(&state, &req);
    let mut state = lock(&state);
    if state.cut_runs > 0 {
        state.cut_runs -= 1;
        // A body stream that fails makes actix-web abandon the response and close the
        // connection, so the client sees its answer broken off part way.
        let cut = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut by the test");
        let body = futures_util::stream::once(async move { Err::<web::Bytes, _>(cut) });
        return HttpResponse::Ok().streaming(body);
    }
    let view = if state.runs.len() > 1 {
        state.runs.pop_front()
    } else {
        state.runs.front().cloned()
    };
    match view {
        Some(view) => HttpResponse::Ok().json(view),
        None => {
            HttpResponse::NotFound().json(json!({"error": "not_found", "message": "no such run"}))
        }
    }
}

async fn cancel(state: web::Data<Mutex<State>>, req: HttpRequest) -> HttpResponse {
    record(&state, &req);
    HttpResponse::Conflict().json(json!({"error": "run_ended", "message": "run already ended"}))
}

async fn socket(
    state: web::Data<Mutex<State>>,
    req: HttpRequest,
    body: web::Payload,
) -> actix_web::Result<HttpResponse> {
    record(&state, &req);
    let script = lock(&state).sockets.pop_front();
    match script {
        Some(script) => {
            let session = Session {
                state: state.into_inner(),
                script,
            };
            ws::start(session, &req, body)
        }
        None => Ok(HttpResponse::NotFound().finish()),
    }
}

/// One scripted WebSocket connection.
struct Session {
    state: Arc<Mutex<State>>,
    script: Vec<Action>,
}

impl Actor for Session {
    type Context = ws::WebsocketContext<Self>;
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let text = match msg {
            Ok(ws::Message::Text(text)) => text,
            Ok(ws::Message::Ping(payload)) => return ctx.pong(&payload),
            Ok(ws::Message::Close(_)) | Err(_) => return ctx.stop(),
            Ok(_) => return,
        };
        let frame: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match frame.get("type").and_then(Value::as_str) {
            Some("ping") => ctx.text(json!({"type": "pong"}).to_string()),
            Some("subscribe") => {
                lock(&self.state).subscribes.push(frame.clone());
                for action in std::mem::take(&mut self.script) {
                    match action {
                        Action::Send(value) => ctx.text(value.to_string()),
                        Action::SetRuns(runs) => lock(&self.state).runs = runs.into(),
                        Action::Drop => return ctx.stop(),
                    }
                }
            }
            _ => {}
        }
    }
}
