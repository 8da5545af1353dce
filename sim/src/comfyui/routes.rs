//! ComfyUI's HTTP routes; each also answers under `/api`.
//!
//! - `GET  /system_stats`, `/features`, `/embeddings`
//! - `GET  /prompt` (queue size), `POST /prompt` (submit)
//! - `GET  /queue`, `POST /queue` (`{delete}` / `{clear}`)
//! - `POST /interrupt` (global, or `{prompt_id}` targeted unless `mint_prompt_ids` is set)
//! - `GET  /history`, `/history/{id}`, `POST /history` (`{delete}` / `{clear}`)
//! - `GET  /view`, `POST /upload/image`
//! - `GET  /object_info`, `/object_info/{class}`, `/models`, `/models/{folder}`
//! - `GET  /ws?clientId=X`
//! - `GET  /api/jobs/{id}` only with `jobs_api` set: newer ComfyUI has it, 0.3.64 answers
//!   the route with aiohttp's plain 404
//! - `POST /sim/control`, `GET /sim/stats`: the simulator's test switches

use std::sync::{atomic::Ordering, Arc};

use actix_files::NamedFile;
use actix_multipart::Multipart;
use actix_web::{
    http::header::{self, HeaderValue},
    web, HttpRequest, HttpResponse,
};
use futures_util::TryStreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    prompt::{Checker, PromptRequest, Rejection},
    state::{model_folders, Queued, Shared},
    ws::Session,
};

type Data = web::Data<Arc<Shared>>;

/// Registers every route at the root and under `/api`.
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api")
            .route("/jobs/{id}", web::get().to(job))
            .configure(routes),
    );
    routes(cfg);
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/system_stats", web::get().to(system_stats))
        .route("/features", web::get().to(features))
        .route(
            "/embeddings",
            web::get().to(|| async { json_ok(json!([])) }),
        )
        .route("/prompt", web::get().to(prompt_info))
        .route("/prompt", web::post().to(submit))
        .route("/queue", web::get().to(queue))
        .route("/queue", web::post().to(edit_queue))
        .route("/interrupt", web::post().to(interrupt))
        .route("/history", web::get().to(history))
        .route("/history", web::post().to(edit_history))
        .route("/history/{id}", web::get().to(history_entry))
        .route("/view", web::get().to(view))
        .route("/upload/image", web::post().to(upload))
        .route("/object_info", web::get().to(object_info))
        .route("/object_info/{class}", web::get().to(object_info_class))
        .route(
            "/models",
            web::get().to(|| async { json_ok(json!(model_folders())) }),
        )
        .route("/models/{folder}", web::get().to(models))
        .route("/ws", web::get().to(websocket))
        .route("/sim/control", web::post().to(control))
        .route("/sim/stats", web::get().to(stats));
}

/// aiohttp's JSON content type.
fn json_ok(value: Value) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json; charset=utf-8")
        .body(value.to_string())
}

async fn system_stats(data: Data) -> HttpResponse {
    let config = data.config();
    let total = config.vram_mb * 1024 * 1024;
    let loaded = data.state().loaded_models.len() as u64;
    let free = total.saturating_sub(loaded * config.model_vram_mb * 1024 * 1024);
    json_ok(json!({
        "system": {
            "os": "posix", "ram_total": 34_359_738_368u64, "ram_free": 30_000_000_000u64,
            "comfyui_version": "0.3.64", "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95", "required_templates_version": "0.1.95",
            "python_version": "3.11.7 (multiplex-sim)", "pytorch_version": "2.8.0+cu128",
            "embedded_python": false, "argv": ["main.py", "--listen"],
        },
        "devices": [{
            "name": config.gpu_name, "type": "cuda", "index": 0,
            "vram_total": total, "vram_free": free,
            "torch_vram_total": total, "torch_vram_free": free,
        }],
    }))
}

async fn features() -> HttpResponse {
    json_ok(json!({"supports_preview_metadata": true, "max_upload_size": 104_857_600}))
}

async fn prompt_info(data: Data) -> HttpResponse {
    let remaining = data.state().queue_remaining();
    json_ok(json!({"exec_info": {"queue_remaining": remaining}}))
}

/// aiohttp's answer when a handler raises (malformed JSON included).
fn server_trouble() -> HttpResponse {
    HttpResponse::InternalServerError()
        .content_type("text/plain; charset=utf-8")
        .body("500 Internal Server Error\n\nServer got itself in trouble")
}

async fn submit(data: Data, body: web::Bytes) -> HttpResponse {
    data.counters
        .prompts_received
        .fetch_add(1, Ordering::Relaxed);
    let Ok(Value::Object(raw)) = serde_json::from_slice::<Value>(&body) else {
        return server_trouble();
    };
    data.counters.count_prompt_ids(&raw);
    // Numbered before validation: rejected prompts use up numbers too.
    let number = match raw.get("number").and_then(Value::as_f64) {
        Some(explicit) => json!(explicit),
        None => {
            let mut state = data.state();
            let number = state.number;
            state.number += 1;
            let front = raw.get("front").and_then(Value::as_bool).unwrap_or(false);
            json!(if front { -number } else { number })
        }
    };
    if !raw.contains_key("prompt") {
        return HttpResponse::BadRequest().json(Rejection::no_prompt().0);
    }
    let Ok(request) = serde_json::from_slice::<PromptRequest>(&body) else {
        let rejection = Rejection::invalid("Prompt is not a map of nodes", "");
        return HttpResponse::BadRequest().json(rejection.0);
    };
    accept(&data, request, number)
}

fn accept(data: &Shared, request: PromptRequest, number: Value) -> HttpResponse {
    let graph = request.prompt.unwrap_or_default();
    let input_exists = |name: &str| data.files.input_exists(name);
    let verdict = data.with_combos(|combos| {
        let checker = Checker {
            classes: &data.classes,
            combos,
            input_exists: &input_exists,
        };
        checker.validate(&graph)
    });
    let accepted = match verdict {
        Ok(accepted) => accepted,
        Err(rejection) => return HttpResponse::BadRequest().json(rejection.0),
    };
    let minting = data.state().switches.mint_prompt_ids;
    let prompt_id = request
        .prompt_id
        .filter(|_| !minting)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut extra_data = request.extra_data.unwrap_or_default();
    if let Some(client_id) = request.client_id {
        extra_data.insert("client_id".into(), json!(client_id));
    }
    {
        let mut state = data.state();
        state.seq += 1;
        let item = Queued {
            number: number.clone(),
            seq: state.seq,
            id: prompt_id.clone(),
            graph,
            extra_data,
            outputs: accepted.outputs,
        };
        state.pending.push(Arc::new(item));
    }
    tracing::debug!(%prompt_id, "prompt queued");
    data.broadcast_status();
    data.wake.notify_one();
    json_ok(json!({"prompt_id": prompt_id, "number": number, "node_errors": accepted.node_errors}))
}

async fn queue(data: Data) -> HttpResponse {
    let state = data.state();
    let running: Vec<Value> = state.running.iter().map(|r| r.item.entry()).collect();
    json_ok(json!({"queue_running": running, "queue_pending": state.sorted_pending()}))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Edit {
    delete: Vec<String>,
    clear: bool,
}

fn parse_edit(body: &[u8]) -> Edit {
    serde_json::from_slice(body).unwrap_or_default()
}

async fn edit_queue(data: Data, body: web::Bytes) -> HttpResponse {
    let edit = parse_edit(&body);
    {
        let mut state = data.state();
        if edit.clear {
            state.pending.clear();
        }
        state.pending.retain(|q| !edit.delete.contains(&q.id));
    }
    data.broadcast_status();
    HttpResponse::Ok().finish()
}

async fn interrupt(data: Data, body: web::Bytes) -> HttpResponse {
    data.counters
        .interrupts_received
        .fetch_add(1, Ordering::Relaxed);
    let mut state = data.state();
    // Older servers read no body: they stop whatever runs, whoever asked.
    let target = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("prompt_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|_| !state.switches.mint_prompt_ids);
    let running = state.running.as_ref().map(|r| r.item.id.clone());
    let hits = match (&target, &running) {
        (None, Some(_)) => true,
        (Some(target), Some(running)) => target == running,
        _ => false,
    };
    if hits {
        state.interrupt = true;
    }
    HttpResponse::Ok().finish()
}

#[derive(Deserialize)]
struct HistoryQuery {
    max_items: Option<usize>,
}

async fn history(data: Data, query: web::Query<HistoryQuery>) -> HttpResponse {
    let state = data.state();
    let skip = query
        .max_items
        .map_or(0, |max| state.history.len().saturating_sub(max));
    let entries: Map<String, Value> = state.history.iter().skip(skip).cloned().collect();
    json_ok(Value::Object(entries))
}

async fn history_entry(data: Data, id: web::Path<String>) -> HttpResponse {
    let state = data.state();
    let found = state.history.iter().find(|(k, _)| *k == *id);
    let mut body = Map::new();
    if let Some((key, entry)) = found {
        body.insert(key.clone(), entry.clone());
    }
    json_ok(Value::Object(body))
}

/// `GET /api/jobs/{id}` as newer ComfyUI answers it (`comfy_execution/jobs.py`): history
/// first, then the running and pending prompts; unknown ids get a JSON 404.
async fn job(data: Data, id: web::Path<String>) -> HttpResponse {
    if !data.config().jobs_api {
        return HttpResponse::NotFound()
            .content_type("text/plain; charset=utf-8")
            .body("404: Not Found");
    }
    let state = data.state();
    if let Some((_, entry)) = state.history.iter().find(|(k, _)| *k == *id) {
        let failed = entry["status"]["status_str"] == "error";
        return json_ok(
            json!({"id": *id, "status": if failed { "failed" } else { "completed" },
            "outputs": entry["outputs"], "execution_status": entry["status"]}),
        );
    }
    let running = state.running.iter().any(|r| r.item.id == *id);
    if running || state.pending.iter().any(|q| q.id == *id) {
        let status = if running { "in_progress" } else { "pending" };
        return json_ok(json!({"id": *id, "status": status, "outputs_count": 0}));
    }
    HttpResponse::NotFound().json(json!({"error": "Job not found"}))
}

async fn edit_history(data: Data, body: web::Bytes) -> HttpResponse {
    let edit = parse_edit(&body);
    let mut state = data.state();
    if edit.clear {
        state.history.clear();
    }
    state.history.retain(|(id, _)| !edit.delete.contains(id));
    HttpResponse::Ok().finish()
}

#[derive(Deserialize)]
struct ViewQuery {
    filename: Option<String>,
    #[serde(default)]
    subfolder: String,
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn view(data: Data, req: HttpRequest, query: web::Query<ViewQuery>) -> HttpResponse {
    let Some(filename) = query.filename.as_deref() else {
        return HttpResponse::BadRequest().finish();
    };
    let kind = query.kind.as_deref().unwrap_or("output");
    let Some(path) = data.files.view_path(filename, &query.subfolder, kind) else {
        return HttpResponse::BadRequest().finish();
    };
    let Ok(file) = NamedFile::open_async(&path).await else {
        return HttpResponse::NotFound().finish();
    };
    let mut response = file.into_response(&req);
    let disposition = format!("filename=\"{filename}\"");
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

/// The parts of an `/upload/image` form.
#[derive(Default)]
struct UploadForm {
    image: Option<(String, Vec<u8>)>,
    kind: Option<String>,
    subfolder: String,
    overwrite: bool,
}

async fn read_form(mut form: Multipart) -> Result<UploadForm, actix_web::Error> {
    let mut out = UploadForm::default();
    while let Some(mut field) = form.try_next().await? {
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field
            .content_disposition()
            .and_then(|d| d.get_filename())
            .map(str::to_owned);
        let mut bytes = Vec::new();
        while let Some(chunk) = field.try_next().await? {
            bytes.extend_from_slice(&chunk);
        }
        let text = || String::from_utf8_lossy(&bytes).into_owned();
        match name.as_str() {
            "image" => out.image = filename.map(|f| (f, bytes.clone())),
            "type" => out.kind = Some(text()),
            "subfolder" => out.subfolder = text(),
            "overwrite" => out.overwrite = matches!(text().as_str(), "true" | "1"),
            _ => {}
        }
    }
    Ok(out)
}

async fn upload(data: Data, form: Multipart) -> HttpResponse {
    let Ok(form) = read_form(form).await else {
        return HttpResponse::BadRequest().finish();
    };
    let Some((filename, bytes)) = form.image.filter(|(f, _)| !f.is_empty()) else {
        return HttpResponse::BadRequest().finish();
    };
    let kind = form.kind.unwrap_or_else(|| "input".into());
    let stored = data
        .files
        .store_upload(&kind, &form.subfolder, &filename, &bytes, form.overwrite);
    match stored {
        Some(Ok(name)) => json_ok(json!({"name": name, "subfolder": form.subfolder, "type": kind})),
        Some(Err(error)) => {
            tracing::warn!(%error, "upload could not be stored");
            server_trouble()
        }
        None => HttpResponse::BadRequest().finish(),
    }
}

async fn object_info(data: Data) -> HttpResponse {
    let all = data.with_combos(|src| {
        let mut names: Vec<&&str> = data.classes.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| ((*n).to_owned(), data.classes[*n].info(src)))
            .collect()
    });
    json_ok(Value::Object(all))
}

async fn object_info_class(data: Data, class: web::Path<String>) -> HttpResponse {
    let mut body = Map::new();
    if let Some(def) = data.classes.get(class.as_str()) {
        body.insert(class.to_string(), data.with_combos(|src| def.info(src)));
    }
    json_ok(Value::Object(body))
}

async fn models(data: Data, folder: web::Path<String>) -> HttpResponse {
    if !model_folders().contains(&folder.as_str()) {
        return HttpResponse::NotFound().finish();
    }
    json_ok(json!(data.models(&folder)))
}

#[derive(Deserialize)]
struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

async fn websocket(
    data: Data,
    req: HttpRequest,
    query: web::Query<WsQuery>,
    stream: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    if data.state().switches.refuse_ws {
        data.counters.ws_refused.fetch_add(1, Ordering::Relaxed);
        return Ok(HttpResponse::ServiceUnavailable().finish());
    }
    data.counters.ws_connections.fetch_add(1, Ordering::Relaxed);
    let client_id = query
        .client_id
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let session = Session {
        client_id,
        shared: data.get_ref().clone(),
        session: 0,
        preview_metadata: Default::default(),
    };
    actix_web_actors::ws::start(session, &req, stream)
}

async fn control(data: Data, body: web::Json<super::ComfyControl>) -> HttpResponse {
    super::apply_control(&data, body.into_inner());
    stats(data).await
}

async fn stats(data: Data) -> HttpResponse {
    json_ok(super::stats_json(&data))
}
