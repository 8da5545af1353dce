//! ComfyUI's REST API: submit, inspect, upload, download, cancel.
//!
//! Requests carry no `Origin` header: ComfyUI refuses (403) an Origin naming another host than
//! its Host header, which is what a request through an SSH tunnel would look like. Files go
//! both ways as streams, so a multi-GB video never sits in memory.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use reqwest::{Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio_util::io::ReaderStream;
use tracing::debug;
use url::Url;

use super::history::{HistoryEntry, OutputFile, QueueState, SystemStats};
use super::ComfyError;
use crate::artifact::{ArtifactKind, ArtifactMeta};
use crate::store::ArtifactFiles;

/// How long to wait for a TCP connection to a node before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a short REST call (stats, queue, history, jobs, prompt, interrupt) may take, answer
/// body included. ComfyUI answers these in milliseconds even while it samples; without a
/// limit, a server that accepts connections but never answers (or a keep-alive connection
/// dropped on the way) would hold a health probe or a job's history check forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest an upload may take: inputs are images or short videos sent over a home or office
/// link, so minutes, not seconds, but still bounded. Downloads from `/view` have no total
/// limit (a multi-GB video may stream for long); only their connect is bounded.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// How much of an unexpected answer's body is kept for the error message.
const ERROR_BODY_LIMIT: usize = 2048;

/// A REST client for one ComfyUI server. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct ComfyClient {
    http: reqwest::Client,
    base: Url,
    /// Set once the server showed it has no `GET /api/jobs/{id}` (before ComfyUI added it),
    /// so later looks go straight to history and queue. Shared by clones.
    no_jobs_route: Arc<AtomicBool>,
}

/// Where a prompt stands according to `GET /api/jobs/{id}` (recent ComfyUI).
#[derive(Debug, Clone, PartialEq)]
pub enum JobLookup {
    /// The server has no such route, or answered something unreadable: ask history and queue.
    Unsupported,
    /// Neither queued, running nor in history.
    Unknown,
    Pending,
    Running,
    /// Finished, well or not: the same entry `/history/{id}` would give.
    Finished(Box<HistoryEntry>),
}

/// ComfyUI's answer to an accepted `POST /prompt`.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The id the server runs the prompt under: ours on recent servers, its own on old ones.
    pub prompt_id: String,
    /// Queue position (negative for `front: true`); ComfyUI may send it as a float.
    pub number: Option<i64>,
    /// Outputs dropped because of validation errors; the rest of the prompt still runs.
    pub node_errors: Map<String, Value>,
}

/// Where ComfyUI stored an uploaded image; `name` may differ from the name sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedImage {
    pub name: String,
    pub subfolder: String,
    pub folder_type: String,
}

impl UploadedImage {
    /// The value a `LoadImage` input takes to load this file.
    pub fn load_image_value(&self) -> String {
        if self.subfolder.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.subfolder, self.name)
        }
    }
}

impl ComfyClient {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:8188`).
    pub fn new(base: Url) -> ComfyClient {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            // Building fails only if the TLS backend cannot initialise: a broken install.
            .unwrap_or_else(|_| reqwest::Client::new());
        ComfyClient::with_http(base, http)
    }

    /// A client sharing an existing connection pool.
    pub fn with_http(base: Url, http: reqwest::Client) -> ComfyClient {
        ComfyClient {
            http,
            base,
            no_jobs_route: Arc::default(),
        }
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// `GET /system_stats`: version and devices with their VRAM.
    pub async fn system_stats(&self) -> Result<SystemStats, ComfyError> {
        let answer = self.get_json("system_stats").await?;
        Ok(SystemStats::from_answer(answer))
    }

    /// `GET /queue`: the running and pending prompt ids.
    pub async fn queue(&self) -> Result<QueueState, ComfyError> {
        let answer = self.get_json("queue").await?;
        Ok(QueueState::from_answer(&answer))
    }

    /// `GET /history/{id}`. `None` means "still queued or running, or unknown": tell them
    /// apart with [`queue`](Self::queue). The bare `/history` list is never requested.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, ComfyError> {
        let answer = self
            .get_json(&format!("history/{}", encode(prompt_id)))
            .await?;
        Ok(HistoryEntry::from_answer(prompt_id, &answer))
    }

    /// `GET /history?max_items=N`: the `max_items` most recently finished prompts, for
    /// finding one whose id we never learned (see [`crate::comfyui::job::locate`]). The
    /// answer is read up to `byte_limit` bytes; `None` past that, since a server that
    /// ignored `max_items` is sending its whole history (hundreds of megabytes), which is
    /// exactly what the bare `/history` list must never cost us.
    pub async fn recent_history(
        &self,
        max_items: usize,
        byte_limit: usize,
    ) -> Result<Option<Value>, ComfyError> {
        let mut url = self.url("history")?;
        url.query_pairs_mut()
            .append_pair("max_items", &max_items.to_string());
        let mut response = self
            .send(self.http.get(url.clone()), &url, REQUEST_TIMEOUT)
            .await?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|source| transport(&url, source, REQUEST_TIMEOUT))?
        {
            if body.len() + chunk.len() > byte_limit {
                debug!(byte_limit, "recent history too large; max_items ignored?");
                return Ok(None);
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            return Err(unexpected(&url, status, &text));
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|err| ComfyError::Decode {
                url: url.to_string(),
                detail: err.to_string(),
            })
    }

    /// `GET /api/jobs/{id}`: one request instead of history, queue and history again. Servers
    /// without the route answer aiohttp's plain-text 404 (a job the route does not know gets a
    /// JSON `{"error"}` 404); that is remembered and [`JobLookup::Unsupported`] returned from
    /// then on without asking.
    pub async fn job(&self, prompt_id: &str) -> Result<JobLookup, ComfyError> {
        if self.no_jobs_route.load(Ordering::Relaxed) {
            return Ok(JobLookup::Unsupported);
        }
        let url = self.url(&format!("api/jobs/{}", encode(prompt_id)))?;
        let response = self
            .send(self.http.get(url.clone()), &url, REQUEST_TIMEOUT)
            .await?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|source| transport(&url, source, REQUEST_TIMEOUT))?;
        let answer: Option<Value> = serde_json::from_str(&text).ok();
        let lookup = match (status, &answer) {
            (StatusCode::NOT_FOUND, Some(body)) if body.get("error").is_some() => {
                JobLookup::Unknown
            }
            (StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED, _) => {
                debug!("no /api/jobs route; using history and queue");
                self.no_jobs_route.store(true, Ordering::Relaxed);
                JobLookup::Unsupported
            }
            (status, _) if !status.is_success() => return Err(unexpected(&url, status, &text)),
            (_, Some(job)) => JobLookup::from_answer(prompt_id, job),
            (_, None) => JobLookup::Unsupported,
        };
        Ok(lookup)
    }

    /// `POST /prompt` with our prompt id and client id. A 400 is returned verbatim as
    /// [`ComfyError::Rejected`]; read the id to follow from the answer, not from the request.
    pub async fn submit(
        &self,
        prompt: &Value,
        prompt_id: &str,
        client_id: &str,
        extra_data: Option<&Map<String, Value>>,
    ) -> Result<Accepted, ComfyError> {
        let mut body = json!({"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id});
        if let Some(extra) = extra_data {
            body["extra_data"] = Value::Object(extra.clone());
        }
        let url = self.url("prompt")?;
        let response = self
            .send(
                self.http.post(url.clone()).json(&body),
                &url,
                REQUEST_TIMEOUT,
            )
            .await?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|source| transport(&url, source, REQUEST_TIMEOUT))?;
        if status == StatusCode::BAD_REQUEST {
            if let Ok(answer) = serde_json::from_str::<Value>(&text) {
                return Err(ComfyError::Rejected {
                    prompt_id: prompt_id.to_string(),
                    error: Box::new(answer.get("error").cloned().unwrap_or(Value::Null)),
                    node_errors: Box::new(answer.get("node_errors").cloned().unwrap_or(json!({}))),
                });
            }
        }
        if !status.is_success() {
            // ComfyUI answers malformed requests with a plain-text 500.
            return Err(unexpected(&url, status, &text));
        }
        let answer: Value = serde_json::from_str(&text).map_err(|err| ComfyError::Decode {
            url: url.to_string(),
            detail: err.to_string(),
        })?;
        let accepted = Accepted {
            prompt_id: answer
                .get("prompt_id")
                .and_then(Value::as_str)
                .unwrap_or(prompt_id)
                .to_string(),
            number: answer
                .get("number")
                .and_then(|n| n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))),
            node_errors: answer
                .get("node_errors")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        };
        debug!(prompt_id = %accepted.prompt_id, number = ?accepted.number, "prompt accepted");
        Ok(accepted)
    }

    /// `POST /upload/image` (multipart `image`, `type=input`, `overwrite=true`), streaming the
    /// file from disk. Use the returned name: ComfyUI may rename on a clash.
    pub async fn upload_image(
        &self,
        path: &Path,
        filename: &str,
    ) -> Result<UploadedImage, ComfyError> {
        let io_error = |source| ComfyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = tokio::fs::File::open(path).await.map_err(io_error)?;
        let len = file.metadata().await.map_err(io_error)?.len();
        let body = reqwest::Body::wrap_stream(ReaderStream::new(file));
        let (_, mime) = crate::artifact::classify_filename(filename);
        let part = Part::stream_with_length(body, len)
            .file_name(filename.to_string())
            .mime_str(mime)
            .map_err(|err| ComfyError::Decode {
                url: mime.into(),
                detail: err.to_string(),
            })?;
        let form = Form::new()
            .part("image", part)
            .text("type", "input")
            .text("overwrite", "true");
        let url = self.url("upload/image")?;
        let request = self.http.post(url.clone()).multipart(form);
        let response = self.send(request, &url, UPLOAD_TIMEOUT).await?;
        let answer = json_answer(response, &url, UPLOAD_TIMEOUT).await?;
        let field = |key: &str| answer.get(key).and_then(Value::as_str).map(str::to_string);
        let name = field("name").ok_or_else(|| ComfyError::Decode {
            url: url.to_string(),
            detail: format!("no `name` in the upload answer {answer}"),
        })?;
        debug!(sent = filename, stored = %name, bytes = len, "image uploaded");
        Ok(UploadedImage {
            name,
            subfolder: field("subfolder").unwrap_or_default(),
            folder_type: field("type").unwrap_or_else(|| "input".into()),
        })
    }

    /// `GET /view?filename&subfolder&type`, streamed into the artifact store.
    pub async fn download(
        &self,
        output: &OutputFile,
        files: &ArtifactFiles,
        kind: ArtifactKind,
    ) -> Result<ArtifactMeta, ComfyError> {
        let mut url = self.url("view")?;
        url.query_pairs_mut()
            .append_pair("filename", &output.filename)
            .append_pair("subfolder", &output.subfolder)
            .append_pair("type", &output.folder_type);
        // No total limit (see UPLOAD_TIMEOUT); the client's connect timeout still applies.
        let response = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|source| transport(&url, source, CONNECT_TIMEOUT))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(unexpected(&url, status, &text));
        }
        let mime = if output.mime == "application/octet-stream" {
            response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .unwrap_or(&output.mime)
                .to_string()
        } else {
            output.mime.clone()
        };
        let meta = files
            .put_stream(response.bytes_stream(), &output.filename, kind, &mime)
            .await
            .map_err(|source| ComfyError::Store {
                filename: output.filename.clone(),
                source,
            })?;
        debug!(file = %output.filename, artifact = %meta.id, size = meta.size, "output stored");
        Ok(meta)
    }

    /// `POST /interrupt {prompt_id}`: recent servers stop the prompt only if it is the one
    /// running; older ones ignore the body and stop whatever runs, so call this only for a
    /// prompt `/queue` shows running (see [`crate::comfyui::job::cancel`]). Interruption
    /// lands at the next node boundary.
    pub async fn interrupt(&self, prompt_id: &str) -> Result<(), ComfyError> {
        self.post_ok("interrupt", &json!({"prompt_id": prompt_id}))
            .await
    }

    /// `POST /queue {delete: [ids]}`: removes pending prompts; unknown ids are ignored.
    pub async fn delete_queued(&self, prompt_ids: &[String]) -> Result<(), ComfyError> {
        self.post_ok("queue", &json!({"delete": prompt_ids})).await
    }

    async fn post_ok(&self, path: &str, body: &Value) -> Result<(), ComfyError> {
        let url = self.url(path)?;
        let response = self
            .send(
                self.http.post(url.clone()).json(body),
                &url,
                REQUEST_TIMEOUT,
            )
            .await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        Err(unexpected(&url, status, &text))
    }

    async fn get_json(&self, path: &str) -> Result<Value, ComfyError> {
        let url = self.url(path)?;
        let response = self
            .send(self.http.get(url.clone()), &url, REQUEST_TIMEOUT)
            .await?;
        json_answer(response, &url, REQUEST_TIMEOUT).await
    }

    /// Sends a request that must be answered in full within `limit` (reqwest's per-request
    /// timeout runs until the body has been read).
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &Url,
        limit: Duration,
    ) -> Result<Response, ComfyError> {
        request
            .timeout(limit)
            .send()
            .await
            .map_err(|source| transport(url, source, limit))
    }

    fn url(&self, path: &str) -> Result<Url, ComfyError> {
        join(&self.base, path)
    }
}

impl JobLookup {
    /// Reads a job record (`comfy_execution/jobs.py`): `status` is `pending`, `in_progress`,
    /// `completed` or `failed`; finished records carry `outputs` and `execution_status`.
    fn from_answer(prompt_id: &str, job: &Value) -> JobLookup {
        match job.get("status").and_then(Value::as_str) {
            Some("pending") => JobLookup::Pending,
            Some("in_progress") => JobLookup::Running,
            Some("completed" | "failed") if job.get("outputs").is_some() => {
                // Rebuilt as the history answer it summarises, so one reader serves both.
                let entry = json!({prompt_id: {"outputs": job["outputs"],
                    "status": job.get("execution_status").cloned().unwrap_or(Value::Null)}});
                match HistoryEntry::from_answer(prompt_id, &entry) {
                    Some(entry) => JobLookup::Finished(Box::new(entry)),
                    None => JobLookup::Unsupported,
                }
            }
            _ => JobLookup::Unsupported,
        }
    }
}

/// Joins a path to a base URL, keeping any path prefix the base has (a reverse proxy may
/// serve ComfyUI under `/comfy/`).
pub(crate) fn join(base: &Url, path: &str) -> Result<Url, ComfyError> {
    let mut base = base.clone();
    if !base.path().ends_with('/') {
        let with_slash = format!("{}/", base.path());
        base.set_path(&with_slash);
    }
    base.join(path).map_err(|err| ComfyError::Decode {
        url: path.into(),
        detail: err.to_string(),
    })
}

fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

async fn json_answer(response: Response, url: &Url, limit: Duration) -> Result<Value, ComfyError> {
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|source| transport(url, source, limit))?;
    if !status.is_success() {
        return Err(unexpected(url, status, &text));
    }
    serde_json::from_str(&text).map_err(|err| ComfyError::Decode {
        url: url.to_string(),
        detail: err.to_string(),
    })
}

/// A request that did not complete; one that ran out of time (`limit`) says so, since
/// reqwest's own message for it names only the URL.
fn transport(url: &Url, source: reqwest::Error, limit: Duration) -> ComfyError {
    if source.is_timeout() {
        return ComfyError::TimedOut {
            url: url.to_string(),
            after: limit,
        };
    }
    ComfyError::Transport {
        url: url.to_string(),
        source,
    }
}

fn unexpected(url: &Url, status: StatusCode, body: &str) -> ComfyError {
    let mut body = body.trim().to_string();
    if body.len() > ERROR_BODY_LIMIT {
        let mut cut = ERROR_BODY_LIMIT;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    ComfyError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_keeps_a_path_prefix() {
        let base = Url::parse("http://gpu1:8188").unwrap();
        assert_eq!(
            join(&base, "history/x").unwrap().as_str(),
            "http://gpu1:8188/history/x"
        );
        let proxied = Url::parse("https://proxy/comfy").unwrap();
        assert_eq!(
            join(&proxied, "prompt").unwrap().as_str(),
            "https://proxy/comfy/prompt"
        );
    }

    #[test]
    fn load_image_value_includes_the_subfolder() {
        let plain = UploadedImage {
            name: "rec_input (1).png".into(),
            subfolder: String::new(),
            folder_type: "input".into(),
        };
        assert_eq!(plain.load_image_value(), "rec_input (1).png");
        let sub = UploadedImage {
            subfolder: "recsub".into(),
            ..plain
        };
        assert_eq!(sub.load_image_value(), "recsub/rec_input (1).png");
    }
}
