//! The CLI's side of the daemon: `multiplex submit`, `status`, `nodes`, `cancel` and `follow`
//! talk to a running daemon only through its public HTTP and WebSocket API, exactly as the web
//! UI and scripts do. Going through the API (rather than opening the sled store) means the CLI
//! works against a remote daemon, never races the daemon for the store's lock, and exercises
//! the same contract everyone else depends on.
//!
//! - [`DaemonClient`] wraps the REST routes and turns the daemon's error bodies into errors a
//!   person can act on ([`DaemonError`]).
//! - [`follow_run`] watches one run live over the WebSocket, drawing a progress bar per step,
//!   and survives a dropped socket or a restarting daemon (`follow`).
//! - [`print_run_summary`] and the `print_*_table` functions render views on stdout
//!   (`render`).
//!
//! Every answer is handled as loose JSON read through `view`, so a daemon of another version
//! or a truncated answer degrades to "-" in a cell instead of a panic or a refusal.

mod follow;
mod progress;
mod render;
mod view;

#[cfg(test)]
mod test_server;
#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use url::Url;

pub use follow::follow_run;
pub use render::{
    print_nodes_table, print_run_summary, print_run_table, print_runs_table, print_tunnels_table,
};

/// How long to wait for a TCP connection to the daemon before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound on one REST exchange; every route answers small JSON, so a slower answer means
/// a wedged daemon rather than a big payload.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the CLI reads its bearer token unless `--token-env` names another variable.
pub const TOKEN_ENV: &str = "MULTIPLEX_TOKEN";

/// A bearer token and the variable it came from (named in messages; the token never is).
#[derive(Clone)]
pub struct Credential {
    secret: String,
    pub source: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential(from {})", self.source)
    }
}

impl Credential {
    /// The token in `named`, or in [`TOKEN_ENV`] when `None`. [`TOKEN_ENV`] unset or empty
    /// means no token (a daemon without tokens needs none); a variable named explicitly
    /// must hold one.
    pub fn from_env(named: Option<&str>) -> anyhow::Result<Option<Credential>> {
        let var = named.unwrap_or(TOKEN_ENV);
        let secret = std::env::var(var).unwrap_or_default();
        let secret = secret.trim();
        if secret.is_empty() {
            if named.is_some() {
                anyhow::bail!("--token-env names {var}, which is not set or empty");
            }
            return Ok(None);
        }
        Ok(Some(Credential {
            secret: secret.to_string(),
            source: var.to_string(),
        }))
    }

    /// The token, for an `Authorization: Bearer` header.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

/// A handle on one daemon's REST API. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct DaemonClient {
    /// The daemon's base URL, always ending in `/` so that routes join under any path prefix.
    base: Url,
    http: reqwest::Client,
    /// Sent as a bearer token on every request, REST and WebSocket.
    credential: Option<Credential>,
}

/// What went wrong talking to the daemon, with enough detail to print as-is.
///
/// Callers get these inside `anyhow::Error`; `main` can downcast to pick an exit code.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Nothing answered at the base URL (connection refused, DNS failure, timeout).
    #[error(
        "cannot reach the multiplex daemon at {base}: {cause} (is `multiplex serve` running?)"
    )]
    Unreachable { base: Url, cause: String },

    /// The connection broke or timed out during a request: reset by a restarting daemon,
    /// closed before the answer was complete, or no answer within the request timeout.
    #[error("the connection to the multiplex daemon broke during {request}: {cause}")]
    Interrupted { request: String, cause: String },

    /// The daemon answered with an error status and (usually) its JSON error body.
    #[error("{}", ApiErrorDisplay(self))]
    Api {
        /// The request's method and URL, for the first line of the message.
        request: String,
        status: StatusCode,
        /// The daemon's error code (`invalid_workflow`, `not_found`, ...), when it sent one.
        code: Option<String>,
        /// The daemon's message, or the start of a non-JSON body (a proxy's error page).
        message: String,
        /// Validation problems, each naming the node, edge and field at fault.
        issues: Vec<Issue>,
    },

    /// The daemon wants a (better) token: 401 or 403. One line saying what to change.
    #[error("the daemon refused {request}: {message} ({status}); {hint}")]
    Auth {
        request: String,
        status: StatusCode,
        message: String,
        hint: String,
    },
}

/// One problem the daemon found in a submitted workflow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Issue {
    pub code: Option<String>,
    pub node: Option<String>,
    pub edge: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl DaemonError {
    /// True when retrying later may help: the daemon is down or restarting, or a proxy in
    /// front of it timed out. Used by [`follow_run`] to tell a blip from a real refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            DaemonError::Unreachable { .. } | DaemonError::Interrupted { .. } => true,
            DaemonError::Api { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            DaemonError::Auth { .. } => false,
        }
    }

    /// Builds the error for a 401 or 403, with a hint naming the variable to set.
    fn auth(
        request: String,
        status: StatusCode,
        body: &[u8],
        credential: Option<&Credential>,
    ) -> DaemonError {
        let message = match DaemonError::from_answer(request.clone(), status, body) {
            DaemonError::Api { message, .. } => message,
            other => other.to_string(),
        };
        let hint = match (status, credential) {
            (StatusCode::FORBIDDEN, Some(c)) => {
                format!("the token in {} has too low a role for this", c.source)
            }
            (_, Some(c)) => format!("the token in {} is not one this daemon accepts", c.source),
            (_, None) => {
                format!("set {TOKEN_ENV} (or the variable --token-env names) to a token")
            }
        };
        DaemonError::Auth {
            request,
            status,
            message,
            hint,
        }
    }

    /// Builds the error for a non-success answer from its status and body.
    fn from_answer(request: String, status: StatusCode, body: &[u8]) -> DaemonError {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let (code, message, issues) = match parsed.as_ref().filter(|v| v.is_object()) {
            Some(json) => {
                let message = view::text(json, "message")
                    .or_else(|| view::text(json, "error"))
                    .unwrap_or_else(|| reason(status));
                let issues = view::list(json, "issues")
                    .iter()
                    .map(Issue::from_json)
                    .collect();
                (view::text(json, "error"), message, issues)
            }
            None => {
                let body = String::from_utf8_lossy(body);
                let body = body.split_whitespace().collect::<Vec<_>>().join(" ");
                let body = view::printable(&body);
                let message = if body.is_empty() {
                    reason(status)
                } else {
                    view::truncate(&body, 200)
                };
                (None, message, Vec::new())
            }
        };
        DaemonError::Api {
            request,
            status,
            code,
            message,
            issues,
        }
    }
}

impl Issue {
    /// Reads one entry of an `issues` array, tolerating missing fields.
    pub fn from_json(value: &Value) -> Issue {
        Issue {
            code: view::text(value, "code"),
            node: view::text(value, "node"),
            edge: view::text(value, "edge"),
            field: view::text(value, "field"),
            message: view::text(value, "message").unwrap_or_else(|| "(no message)".to_owned()),
        }
    }
}

impl fmt::Display for Issue {
    /// `node "still", field "data.width": must be positive [invalid_param]`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut wrote = false;
        for (label, part) in [
            ("node", &self.node),
            ("edge", &self.edge),
            ("field", &self.field),
        ] {
            if let Some(part) = part {
                write!(f, "{}{label} {part:?}", if wrote { ", " } else { "" })?;
                wrote = true;
            }
        }
        if wrote {
            f.write_str(": ")?;
        }
        f.write_str(&self.message)?;
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        Ok(())
    }
}

/// Formats [`DaemonError::Api`]: the daemon's message first, then each issue on its own line
/// so a long validation report stays readable in a terminal.
struct ApiErrorDisplay<'a>(&'a DaemonError);

impl fmt::Display for ApiErrorDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DaemonError::Api {
            request,
            status,
            code,
            message,
            issues,
        } = self.0
        else {
            return Ok(());
        };
        write!(
            f,
            "the daemon refused {request}: {message} ({}",
            status.as_u16()
        )?;
        if let Some(code) = code {
            write!(f, " {code}")?;
        }
        f.write_str(")")?;
        for issue in issues {
            write!(f, "\n  - {issue}")?;
        }
        Ok(())
    }
}

/// The status line's reason phrase, for answers without a message of their own.
fn reason(status: StatusCode) -> String {
    status.canonical_reason().unwrap_or("error").to_lowercase()
}

/// The innermost cause of an error chain: for a refused connection that is "Connection
/// refused (os error 111)" rather than reqwest's "error sending request for url (...)".
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = err;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}

impl DaemonClient {
    /// A client for the daemon at `base` (e.g. `http://127.0.0.1:7700`). A path prefix such as
    /// `https://studio.example/multiplex` is kept: routes are joined under it.
    pub fn new(base: Url) -> DaemonClient {
        let mut base = base;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("multiplex-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            // Building only fails when the TLS backend cannot initialise; fall back to the
            // default client so the error, if any, surfaces on the first request with its URL.
            .unwrap_or_default();
        DaemonClient {
            base,
            http,
            credential: None,
        }
    }

    /// Sends `credential` as a bearer token on every request (none when `None`).
    pub fn with_credential(mut self, credential: Option<Credential>) -> DaemonClient {
        self.credential = credential;
        self
    }

    /// The token this client sends, if any.
    pub(crate) fn credential(&self) -> Option<&Credential> {
        self.credential.as_ref()
    }

    /// The base URL every route is joined to (always ending in `/`).
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// Submits a workflow document; answers the new run's view (the daemon answers 201 once
    /// the run is durable).
    pub async fn submit(&self, workflow: &Value) -> anyhow::Result<Value> {
        let url = self.url(&["api", "workflows"]);
        self.send(Method::POST, url, Some(workflow))
            .await
            .context("submitting the workflow")
    }

    /// The current view of one run.
    pub async fn run(&self, id: &str) -> anyhow::Result<Value> {
        let url = self.url(&["api", "workflows", id]);
        self.send(Method::GET, url, None)
            .await
            .with_context(|| format!("fetching run {id}"))
    }

    /// The newest `limit` runs, as `{"runs": [...]}`, newest first.
    pub async fn runs(&self, limit: usize) -> anyhow::Result<Value> {
        let mut url = self.url(&["api", "workflows"]);
        url.query_pairs_mut()
            .append_pair("limit", &limit.to_string());
        self.send(Method::GET, url, None)
            .await
            .context("listing runs")
    }

    /// The configured GPU nodes and their health, as `{"nodes": [...]}`.
    pub async fn nodes(&self) -> anyhow::Result<Value> {
        let url = self.url(&["api", "nodes"]);
        self.send(Method::GET, url, None)
            .await
            .context("listing nodes")
    }

    /// The daemon's SSH tunnels (`GET /api/tunnels`).
    pub async fn tunnels(&self) -> anyhow::Result<Value> {
        let url = self.url(&["api", "tunnels"]);
        self.send(Method::GET, url, None)
            .await
            .context("listing tunnels")
    }

    /// Starts a node's actor over (`POST /api/nodes/{node}/restart`).
    pub async fn restart_node(&self, node: &str) -> anyhow::Result<Value> {
        let url = self.url(&["api", "nodes", node, "restart"]);
        self.send(Method::POST, url, None)
            .await
            .with_context(|| format!("restarting node {node}"))
    }

    /// Makes a node's tunnel start over (`POST /api/tunnels/{node}/reconnect`).
    pub async fn reconnect_tunnel(&self, node: &str) -> anyhow::Result<Value> {
        let url = self.url(&["api", "tunnels", node, "reconnect"]);
        self.send(Method::POST, url, None)
            .await
            .with_context(|| format!("reconnecting the tunnel of {node}"))
    }

    /// Asks the daemon to cancel a run; answers the run's view after the request.
    pub async fn cancel(&self, id: &str) -> anyhow::Result<Value> {
        let url = self.url(&["api", "workflows", id, "cancel"]);
        self.send(Method::POST, url, None)
            .await
            .with_context(|| format!("cancelling run {id}"))
    }

    /// `GET /api/health`: version, node counts and live runs.
    pub async fn health(&self) -> anyhow::Result<Value> {
        let url = self.url(&["api", "health"]);
        self.send(Method::GET, url, None)
            .await
            .context("checking the daemon's health")
    }

    /// The URL of a route, with each segment percent-encoded (run ids come from users).
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// The WebSocket endpoint: `/ws` under the base, with `ws`/`wss` for `http`/`https`.
    pub(crate) fn ws_url(&self) -> Url {
        let mut url = self.url(&["ws"]);
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        // Only fails for schemes that cannot become ws ("file:", "mailto:"); then awc reports
        // the unsupported scheme with the URL, which is the right message anyway.
        let _ = url.set_scheme(scheme);
        url
    }

    /// Sends one request and reads a JSON answer, mapping failures to [`DaemonError`].
    async fn send(&self, method: Method, url: Url, body: Option<&Value>) -> anyhow::Result<Value> {
        tracing::debug!(%method, %url, "daemon request");
        let request = format!("{method} {url}");
        let mut builder = self.http.request(method, url.clone());
        if let Some(body) = body {
            builder = builder.json(body);
        }
        if let Some(credential) = &self.credential {
            builder = builder.bearer_auth(credential.secret());
        }

        let response = builder
            .send()
            .await
            .map_err(|err| self.transport_error(&request, err))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|err| self.transport_error(&request, err))?;
        tracing::debug!(%url, status = status.as_u16(), len = bytes.len(), "daemon answer");

        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            let credential = self.credential.as_ref();
            return Err(DaemonError::auth(request, status, &bytes, credential).into());
        }
        if !status.is_success() {
            return Err(DaemonError::from_answer(request, status, &bytes).into());
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{request} answered invalid JSON"))
    }

    /// Classifies a transport failure: no connection at all means the daemon is not there;
    /// a connection that broke or stalled mid-request (a reused pooled connection reset by a
    /// daemon that restarted, an answer cut short) is just as transient. Only errors that
    /// retrying cannot fix (a malformed request, a redirect loop) stay fatal.
    fn transport_error(&self, request: &str, err: reqwest::Error) -> anyhow::Error {
        if err.is_connect() {
            let cause = root_cause(&err);
            return DaemonError::Unreachable {
                base: self.base.clone(),
                cause,
            }
            .into();
        }
        if err.is_timeout() || err.is_request() || err.is_body() || err.is_decode() {
            return DaemonError::Interrupted {
                request: request.to_owned(),
                cause: root_cause(&err),
            }
            .into();
        }
        let url = err
            .url()
            .map(ToString::to_string)
            .unwrap_or_else(|| self.base.to_string());
        anyhow::Error::new(err).context(format!("talking to the multiplex daemon at {url}"))
    }
}
