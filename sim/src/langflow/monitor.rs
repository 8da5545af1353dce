//! What the simulator remembers of its runs, and the routes that expose it:
//!
//! - `GET  /api/v1/monitor/messages?session_id=...`: the stored messages, oldest first, in
//!   the shape of 08_flow_readback_and_messages (x-api-key checked like the run route)
//! - `POST /sim/control`: [`LangflowControl`], slow runs and injected failures
//! - `GET  /sim/stats`: runs per session id and the sessions run more than once
//!
//! A run stores the user's message when it starts and the answer (or the failing
//! component's error) when it ends, which is what a restarted daemon reads to learn whether
//! a run it lost track of finished.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{routes, Shared};

/// Run-time switches, the body of `POST /sim/control`; absent fields stay.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LangflowControl {
    /// Extra time every run takes, after its user message is stored.
    pub run_delay_ms: Option<u64>,
    /// The next N runs go through (messages stored) but answer 503 with a proxy's HTML
    /// page: the client cannot tell whether the flow ran.
    pub fail_next_503: Option<u32>,
    /// The next N runs fail with LangFlow's 500 `{"detail"}`, storing an error message.
    pub fail_next_500: Option<u32>,
}

/// The switches in force.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Switches {
    pub run_delay_ms: u64,
    pub fail_next_503: u32,
    pub fail_next_500: u32,
}

/// A failure injected into one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Injected {
    ProxyTimeout,
    ServerError,
}

/// Everything remembered across runs. One std mutex: short sections, no `.await` inside.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    /// Monitor records in the order they were stored.
    messages: Vec<Value>,
    runs_by_session: BTreeMap<String, usize>,
    switches: Switches,
}

/// How one run is to go, decided when it starts.
pub(crate) struct RunTicket {
    pub delay_ms: u64,
    pub injected: Option<Injected>,
}

impl Shared {
    fn memory(&self) -> MutexGuard<'_, Memory> {
        // A poisoned lock only means a panic elsewhere; the data is plain.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a run of `session_id`, stores its user message and takes its switches.
    pub(crate) fn begin_run(&self, session_id: &str, question: Value) -> RunTicket {
        let mut memory = self.memory();
        *memory
            .runs_by_session
            .entry(session_id.to_owned())
            .or_default() += 1;
        memory.messages.push(question);
        let switches = &mut memory.switches;
        let injected = if switches.fail_next_503 > 0 {
            switches.fail_next_503 -= 1;
            Some(Injected::ProxyTimeout)
        } else if switches.fail_next_500 > 0 {
            switches.fail_next_500 -= 1;
            Some(Injected::ServerError)
        } else {
            None
        };
        RunTicket {
            delay_ms: switches.run_delay_ms,
            injected,
        }
    }

    /// Stores the message a run ends with.
    pub(crate) fn store_message(&self, record: Value) {
        self.memory().messages.push(record);
    }

    pub(crate) fn apply_control(&self, control: LangflowControl) {
        let switches = &mut self.memory().switches;
        if let Some(delay) = control.run_delay_ms {
            switches.run_delay_ms = delay;
        }
        if let Some(count) = control.fail_next_503 {
            switches.fail_next_503 = count;
        }
        if let Some(count) = control.fail_next_500 {
            switches.fail_next_500 = count;
        }
    }

    pub(crate) fn runs_by_session(&self) -> BTreeMap<String, usize> {
        self.memory().runs_by_session.clone()
    }

    pub(crate) fn duplicate_sessions(&self) -> Vec<String> {
        let memory = self.memory();
        let twice = memory.runs_by_session.iter().filter(|(_, n)| **n > 1);
        twice.map(|(session, _)| session.clone()).collect()
    }

    pub(crate) fn stats(&self) -> Value {
        let runs = self.runs.load(std::sync::atomic::Ordering::Relaxed);
        json!({"runs_received": runs, "runs_by_session": self.runs_by_session(),
            "duplicate_sessions": self.duplicate_sessions(),
            "switches": self.memory().switches})
    }

    pub(crate) fn session_messages(&self, session_id: &str) -> Vec<Value> {
        let memory = self.memory();
        let ours = memory
            .messages
            .iter()
            .filter(|m| m["session_id"] == session_id);
        ours.cloned().collect()
    }
}

pub(crate) fn new_memory() -> Mutex<Memory> {
    Mutex::new(Memory::default())
}

type Data = web::Data<Arc<Shared>>;

#[derive(Deserialize)]
struct MessagesQuery {
    session_id: Option<String>,
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/v1/monitor/messages", web::get().to(messages))
        .route("/sim/control", web::post().to(control))
        .route("/sim/stats", web::get().to(stats));
}

async fn messages(
    data: Data,
    req: HttpRequest,
    key: web::Query<routes::KeyQuery>,
    query: web::Query<MessagesQuery>,
) -> HttpResponse {
    if let Some(refusal) = routes::refuse_run_key(&data, &req, &key) {
        return refusal;
    }
    // LangFlow lists every stored message without a session filter; the simulator keeps
    // to the filtered form Multiplex uses.
    let listed = match &query.session_id {
        Some(session) => data.session_messages(session),
        None => data.memory().messages.clone(),
    };
    HttpResponse::Ok().json(listed)
}

async fn control(data: Data, body: web::Json<LangflowControl>) -> HttpResponse {
    data.apply_control(body.into_inner());
    HttpResponse::Ok().json(data.stats())
}

async fn stats(data: Data) -> HttpResponse {
    HttpResponse::Ok().json(data.stats())
}
