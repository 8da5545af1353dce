//! LangFlow's HTTP routes:
//!
//! - `GET  /health`, `/health_check`, `/api/v1/version`
//! - `POST /api/v1/run/{flow_id_or_endpoint_name}` (`?stream=true` streams)
//! - `POST /api/v1/files/upload/{flow_id}` (multipart `file`)
//! - the stored messages and the simulator's switches: see [`super::monitor`]
//!
//! Check order follows LangFlow 1.13 (checked against a real server): malformed
//! JSON (422), then the API key (403, even for a flow that does not exist), then
//! the flow lookup (404), then the body's shape.

use std::{convert::Infallible, sync::atomic::Ordering, sync::Arc, time::Duration};

use actix_multipart::Multipart;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::{stream, StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    flows::{self, FlowBehavior},
    message::{self, Message, RunIds},
    monitor::{self, Injected},
    Shared, SimFlow,
};

type Data = web::Data<Arc<Shared>>;

const MISSING_KEY: &str = "Since v1.5, LANGFLOW_AUTO_LOGIN requires a valid API key. Set \
                           LANGFLOW_SKIP_AUTH_AUTO_LOGIN=true to skip this check. Please update \
                           your authentication method.";
const CHAT_CONFLICT: &str =
    "If you pass an input_value to the chat input, you cannot pass a tweak with the same name.";
const FAILURE: &str = "simulated failure (multiplex-sim fail flow)";
/// What nginx answers when LangFlow takes longer than its proxy timeout.
const PROXY_TIMEOUT_PAGE: &str = "<html>\r\n<head><title>503 Service Temporarily Unavailable\
    </title></head>\r\n<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1>\
    </center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/health",
        web::get().to(|| async { ok(json!({"status": "ok"})) }),
    )
    .route(
        "/health_check",
        web::get().to(|| async { ok(json!({"status": "ok", "chat": "ok", "db": "ok"})) }),
    )
    .route(
        "/api/v1/version",
        web::get().to(|| async {
            ok(json!({"version": "1.13.0", "main_version": "1.13.0", "package": "Langflow"}))
        }),
    )
    .route("/api/v1/run/{flow}", web::post().to(run))
    .route(
        "/api/v1/run/{flow}",
        web::route().to(|| async { detail(405, "Method Not Allowed") }),
    )
    .route("/api/v1/files/upload/{flow}", web::post().to(upload))
    .configure(monitor::configure)
    .default_service(web::to(|| async { detail(404, "Not Found") }));
}

fn ok(body: Value) -> HttpResponse {
    HttpResponse::Ok().json(body)
}

fn detail(status: u16, text: &str) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).json(json!({"detail": text}))
}

#[derive(Deserialize)]
pub(crate) struct KeyQuery {
    #[serde(rename = "x-api-key")]
    api_key: Option<String>,
    #[serde(default)]
    stream: bool,
}

/// What a 403 says: the run route and the upload route word it differently.
struct Refusals {
    missing: &'static str,
    wrong: &'static str,
}

const RUN_REFUSALS: Refusals = Refusals {
    missing: MISSING_KEY,
    wrong: "Invalid or missing API key",
};

const UPLOAD_REFUSALS: Refusals = Refusals {
    missing: "No authentication credentials provided",
    wrong: "Invalid API key",
};

/// [`refuse_key`] worded as the run route (and the monitor routes) word it.
pub(crate) fn refuse_run_key(
    data: &Shared,
    req: &HttpRequest,
    query: &KeyQuery,
) -> Option<HttpResponse> {
    refuse_key(data, req, query, &RUN_REFUSALS)
}

/// `None` when the key is acceptable, else the 403 answer.
fn refuse_key(
    data: &Shared,
    req: &HttpRequest,
    query: &KeyQuery,
    refusals: &Refusals,
) -> Option<HttpResponse> {
    let expected = data.config.api_key.as_deref()?;
    let header = req.headers().get("x-api-key").and_then(|v| v.to_str().ok());
    // A Bearer header is not an API key: it counts as missing.
    match header.or(query.api_key.as_deref()) {
        None => Some(detail(403, refusals.missing)),
        Some(key) if key != expected => Some(detail(403, refusals.wrong)),
        Some(_) => None,
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum InputType {
    #[default]
    Chat,
    Text,
    Any,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum OutputType {
    Chat,
    Text,
    Any,
    Debug,
}

/// The run body. Any field of the wrong type makes LangFlow run with an
/// empty request instead (07_run_body_validation_quirks).
#[derive(Deserialize, Default)]
#[serde(default)]
struct RunRequest {
    input_value: Option<String>,
    input_type: Option<InputType>,
    #[allow(dead_code)]
    output_type: Option<OutputType>,
    output_component: Option<String>,
    tweaks: Option<Map<String, Value>>,
    session_id: Option<String>,
}

impl RunRequest {
    /// The ChatInput's tweak (keys name the component id or display name).
    fn chat_tweak(&self) -> Option<&Map<String, Value>> {
        self.tweaks.as_ref()?.iter().find_map(|(key, value)| {
            let chat = key.contains("ChatInput") || key.contains("Chat Input");
            value.as_object().filter(|_| chat)
        })
    }

    fn conflicts(&self) -> bool {
        let tweaked = self
            .chat_tweak()
            .is_some_and(|t| !t.get("input_value").is_none_or(Value::is_null));
        tweaked
            && self.input_value.is_some()
            && self.input_type.unwrap_or_default() == InputType::Chat
    }

    /// What the Chat Input component receives.
    fn chat_input(&self) -> String {
        match (&self.input_value, self.input_type.unwrap_or_default()) {
            (Some(value), InputType::Chat | InputType::Any) => value.clone(),
            _ => self
                .chat_tweak()
                .and_then(|t| t.get("input_value"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        }
    }

    fn files(&self) -> Vec<String> {
        match self.chat_tweak().and_then(|t| t.get("files")) {
            Some(Value::String(one)) => vec![one.clone()],
            Some(Value::Array(many)) => many
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Byte offset of a JSON error, as Python's decoder reports it.
fn error_offset(body: &[u8], error: &serde_json::Error) -> usize {
    let text = String::from_utf8_lossy(body);
    let before: usize = text
        .split('\n')
        .take(error.line().saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    // serde's column is 1-based and points at the offending byte; Python
    // reports the 0-based offset just past the input at end of file.
    before + error.column()
}

async fn run(
    data: Data,
    req: HttpRequest,
    flow: web::Path<String>,
    query: web::Query<KeyQuery>,
    body: web::Bytes,
) -> HttpResponse {
    data.runs.fetch_add(1, Ordering::Relaxed);
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(value) => Some(value),
            Err(error) => {
                let loc = json!(["body", error_offset(&body, &error)]);
                let body = json!({"detail": [{"type": "json_invalid", "loc": loc,
                    "msg": "JSON decode error"}]});
                return HttpResponse::UnprocessableEntity().json(body);
            }
        }
    };
    if let Some(refusal) = refuse_key(&data, &req, &query, &RUN_REFUSALS) {
        return refusal;
    }
    let Some(flow) = data.flow(&flow).cloned() else {
        return detail(404, &format!("Flow identifier {flow} not found"));
    };
    let request = match parsed {
        None => RunRequest::default(),
        Some(Value::Object(map)) => serde_json::from_value(Value::Object(map)).unwrap_or_default(),
        Some(_) => {
            let missing = |field| {
                json!({"type": "missing", "loc": ["body", field],
                "msg": "Field required"})
            };
            let body = json!({"detail": [missing("input_request"), missing("context")]});
            return HttpResponse::UnprocessableEntity().json(body);
        }
    };
    if request.conflicts() {
        return detail(400, CHAT_CONFLICT);
    }
    tracing::debug!(flow = %flow.id, stream = query.stream, "run");
    let plan = Plan::new(&data, &flow, &request);
    let ticket = data.begin_run(&plan.ids.session_id, plan.question.record(&plan.ids));
    let data: Arc<Shared> = Arc::clone(data.get_ref());
    if let Some(injected) = ticket.injected {
        return plan.injected(injected, ticket.delay_ms, &data).await;
    }
    if query.stream {
        plan.stream(data.config.token_delay_ms, ticket.delay_ms, data)
    } else {
        plan.answer(data.config.token_delay_ms, ticket.delay_ms, &data)
            .await
    }
}

/// One run, computed up front; answered as JSON or as a stream.
struct Plan {
    ids: RunIds,
    behavior: FlowBehavior,
    inputs: Value,
    question: Message,
    answer: Message,
    output_id: String,
}

impl Plan {
    fn new(data: &Shared, flow: &SimFlow, request: &RunRequest) -> Plan {
        let ids = RunIds {
            flow_id: flow.id.clone(),
            session_id: request
                .session_id
                .clone()
                .unwrap_or_else(|| flow.id.clone()),
            run_id: uuid::Uuid::new_v4().to_string(),
        };
        let input = request.chat_input();
        let text = match flow.behavior {
            FlowBehavior::Echo | FlowBehavior::Fail => input.clone(),
            FlowBehavior::NarrateText => flows::narrate_text(&input),
            FlowBehavior::ExpandPrompt => flows::expand_prompt(&input),
            FlowBehavior::NarrateVisual => {
                flows::narrate_visual(&input, &data.storage(), &request.files())
            }
        };
        let inputs = match &request.input_value {
            Some(value) => json!({"input_value": value}),
            None => json!({}),
        };
        let question = Message {
            id: uuid::Uuid::new_v4().to_string(),
            from_user: true,
            text: input,
            source: None,
            timestamp: message::timestamp(),
        };
        let answer = Message {
            id: uuid::Uuid::new_v4().to_string(),
            from_user: false,
            text,
            source: Some(flow.behavior.middle()),
            timestamp: message::timestamp(),
        };
        let output_id = request
            .output_component
            .clone()
            .unwrap_or_else(|| "ChatOutput-aaaa2".into());
        Plan {
            ids,
            behavior: flow.behavior,
            inputs,
            question,
            answer,
            output_id,
        }
    }

    fn tokens(&self) -> Vec<String> {
        if !self.behavior.generates() {
            return Vec::new();
        }
        let words: Vec<&str> = self.answer.text.split(' ').collect();
        let last = words.len().saturating_sub(1);
        words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i < last {
                    format!("{w} ")
                } else {
                    (*w).to_owned()
                }
            })
            .collect()
    }

    fn failure(&self) -> String {
        message::failure_detail(self.behavior.middle().1, FAILURE)
    }

    /// The record a failing run ends with.
    fn error_record(&self) -> Value {
        message::error_record(&self.ids, self.behavior.middle(), FAILURE)
    }

    /// A run failed on purpose by a switch, streamed or not: the failure comes before any
    /// body. A proxy timeout lets the run finish behind it.
    async fn injected(self, injected: Injected, run_delay_ms: u64, data: &Shared) -> HttpResponse {
        tokio::time::sleep(Duration::from_millis(run_delay_ms)).await;
        match injected {
            Injected::ProxyTimeout => {
                data.store_message(self.answer.record(&self.ids));
                HttpResponse::ServiceUnavailable()
                    .content_type("text/html")
                    .body(PROXY_TIMEOUT_PAGE)
            }
            Injected::ServerError => {
                data.store_message(self.error_record());
                HttpResponse::InternalServerError().json(json!({"detail": self.failure()}))
            }
        }
    }

    async fn answer(self, token_delay_ms: u64, run_delay_ms: u64, data: &Shared) -> HttpResponse {
        let delay = token_delay_ms.saturating_mul(self.tokens().len() as u64);
        tokio::time::sleep(Duration::from_millis(delay.saturating_add(run_delay_ms))).await;
        if self.behavior == FlowBehavior::Fail {
            data.store_message(self.error_record());
            return HttpResponse::InternalServerError().json(json!({"detail": self.failure()}));
        }
        data.store_message(self.answer.record(&self.ids));
        ok(message::run_result(
            &self.ids,
            self.inputs.clone(),
            &self.answer,
            &self.output_id,
        ))
    }

    /// Bare JSON events, each followed by a blank line (05_run_stream). The run's closing
    /// message is stored as the event announcing it goes out, as LangFlow does.
    fn stream(self, token_delay_ms: u64, run_delay_ms: u64, data: Arc<Shared>) -> HttpResponse {
        let event = |kind: &str, data: Value| {
            format!(
                "{}\n\n",
                message::python_json(&json!({"event": kind, "data": data}))
            )
        };
        // (pause before, text, record to store when sent)
        let mut events = vec![(
            0,
            event("add_message", self.question.object(&self.ids, true)),
            None,
        )];
        if self.behavior == FlowBehavior::Fail {
            let error = message::error_message(&self.ids, self.behavior.middle(), FAILURE);
            events.push((0, event("error", error), Some(self.error_record())));
            let detail = format!("500: {}", self.failure());
            events.push((0, event("error", json!({"error": detail})), None));
        } else {
            for chunk in self.tokens() {
                let data = json!({"chunk": chunk, "id": self.answer.id,
                    "timestamp": message::timestamp()});
                events.push((token_delay_ms, event("token", data), None));
            }
            let answer = self.answer.object(&self.ids, true);
            let record = self.answer.record(&self.ids);
            events.push((0, event("add_message", answer), Some(record)));
            let result = message::run_result(
                &self.ids,
                self.inputs.clone(),
                &self.answer,
                &self.output_id,
            );
            events.push((0, event("end", json!({"result": result})), None));
        }
        // The flow's own work (run_delay_ms) comes after the user's message.
        if let Some(first_after) = events.get_mut(1) {
            first_after.0 += run_delay_ms;
        }
        let body = stream::iter(events).then(move |(delay, text, record)| {
            let data = data.clone();
            async move {
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if let Some(record) = record {
                    data.store_message(record);
                }
                Ok::<_, Infallible>(web::Bytes::from(text))
            }
        });
        HttpResponse::Ok()
            .content_type("text/event-stream; charset=utf-8")
            .streaming(body)
    }
}

async fn upload(
    data: Data,
    req: HttpRequest,
    flow: web::Path<String>,
    query: web::Query<KeyQuery>,
    form: Multipart,
) -> HttpResponse {
    if let Some(refusal) = refuse_key(&data, &req, &query, &UPLOAD_REFUSALS) {
        return refusal;
    }
    let Some(flow) = data.config.flows.iter().find(|f| f.id == *flow) else {
        return detail(404, "Flow not found");
    };
    let Ok(Some((filename, bytes))) = read_file(form).await else {
        let missing = json!({"type": "missing", "loc": ["body", "file"], "msg": "Field required"});
        return HttpResponse::UnprocessableEntity().json(json!({"detail": [missing]}));
    };
    let stamp = {
        let now = time::OffsetDateTime::now_utc();
        format!(
            "{:04}-{:02}-{:02}_{:02}-{:02}-{:02}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        )
    };
    let safe_name = filename.replace(['/', '\\'], "_");
    let stored = format!("{stamp}_{safe_name}");
    let folder = data.storage().join(&flow.id);
    let written =
        std::fs::create_dir_all(&folder).and_then(|()| std::fs::write(folder.join(&stored), bytes));
    if let Err(error) = written {
        tracing::warn!(%error, "upload could not be stored");
        return detail(500, "Could not store the file");
    }
    HttpResponse::Created()
        .json(json!({"flowId": flow.id, "file_path": format!("{}/{stored}", flow.id)}))
}

async fn read_file(mut form: Multipart) -> Result<Option<(String, Vec<u8>)>, actix_web::Error> {
    while let Some(mut field) = form.try_next().await? {
        if field.name() != Some("file") {
            continue;
        }
        let name = field
            .content_disposition()
            .and_then(|d| d.get_filename())
            .unwrap_or("upload")
            .to_owned();
        let mut bytes = Vec::new();
        while let Some(chunk) = field.try_next().await? {
            bytes.extend_from_slice(&chunk);
        }
        return Ok(Some((name, bytes)));
    }
    Ok(None)
}
