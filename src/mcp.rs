//! The MCP server at `/mcp`: AI assistants and coding agents run workflows and watch the
//! cluster through the Model Context Protocol.
//!
//! The wire protocol is not ours to get wrong, so it is not ours at all: the official Rust
//! SDK (`rmcp`) owns JSON-RPC, version negotiation (inside `initialize`, or per request with
//! `server/discover` for the 2026-07-28 revision), sessions (`Mcp-Session-Id`, 404 for an
//! unknown or expired one, 400 for a missing one), Accept handling, SSE and the Host and
//! Origin checks; `rmcp-actix-web` mounts it in our actix-web server. This module supplies
//! what is Multiplex's: the tools ([`tools`]), the resources ([`resources`]), and resource
//! update notifications driven by the activity hub ([`feed`]). Every tool goes through the
//! same [`Cluster`] as REST, so a run submitted here is validated, stored and run the same way.
//!
//! [`relay`] is `multiplex mcp`: the same server over stdio, relayed to a running daemon.
//!
//! Auth: every `/mcp` request needs a viewer's token when the daemon has tokens; one without
//! is answered 401 at the HTTP layer ([`crate::http::auth`]) before rmcp sees it. Per
//! request, [`authorize`] hands the caller to the handler, and tools that change the cluster
//! (`submit_workflow`, `cancel_workflow`, `allocate_gpu_resources`, `release_lease`) answer
//! a viewer with a tool error naming the operator role. They stay in `tools/list` for
//! everyone: the list is the same whatever the token, so a client caching it per session
//! is never wrong, and the refusal says what to change. Resources are all readable by a
//! viewer.

pub mod feed;
pub mod relay;
pub mod resources;
pub mod tools;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use actix_web::{HttpMessage, HttpRequest};
use multiplex_actors::cluster::Cluster;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, ListResourceTemplatesResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams,
    ReadResourceResponse, ServerCapabilities, ServerConfig, SubscribeRequestParams,
    SubscriptionFilter, UnsubscribeRequestParams,
};
use rmcp::service::{Peer, RequestContext, RoleServer, SubscriptionContext};
use rmcp::{ErrorData as McpError, ServerHandler};
use rmcp_actix_web::transport::{LocalSessionManager, StreamableHttpService};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info};

use crate::auth::{Caller, Role};
use crate::http::origin::{LOOPBACK_HOSTS, LOOPBACK_ORIGINS};
use feed::ActivityFeed;
use tools::ToolContext;

/// Where the server is mounted.
pub const PATH: &str = "/mcp";

const INSTRUCTIONS: &str = "Multiplex runs AI media workflows (Flux images, Wan 2.1 \
    videos, LLM narration) on a GPU cluster of ComfyUI and LangFlow servers. Read \
    multiplex://templates for what submit_workflow can run by template, \
    multiplex://capabilities for what the nodes can do, then submit_workflow and follow it \
    with get_workflow_status (or a progress token, or a subscription to multiplex://runs/{id}).";

/// What `/mcp` accepts besides loopback, from `[daemon]`.
#[derive(Debug, Clone, Default)]
pub struct McpSettings {
    pub allowed_origins: Vec<String>,
    pub allowed_hosts: Vec<String>,
}

/// The shared parts every session's handler gets.
#[derive(Clone)]
pub struct McpShared {
    cluster: Cluster,
    feed: ActivityFeed,
    /// `http://addr` of the daemon, for absolute artifact links when a request says no
    /// better (see [`LinkBase`]).
    base_url: Arc<str>,
    /// The daemon's arbiter. rmcp runs handlers on plain tokio tasks, but the cluster starts
    /// actors (a run's `WorkflowRun`), which needs an actix context: cluster work is sent
    /// here.
    arbiter: actix::ArbiterHandle,
}

impl McpShared {
    /// Must be called inside the daemon's actix system (it starts the feed's actor).
    pub fn new(cluster: Cluster, base_url: String) -> McpShared {
        let feed = ActivityFeed::start(cluster.hub());
        McpShared {
            cluster,
            feed,
            base_url: base_url.into(),
            arbiter: actix::Arbiter::current(),
        }
    }

    /// Runs `work` on the daemon's arbiter and answers its output; `None` when the arbiter
    /// is gone (the daemon is stopping).
    async fn on_actix<T, F>(&self, work: F) -> Option<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let (done, answer) = tokio::sync::oneshot::channel();
        let spawned = self.arbiter.spawn(async move {
            let _ = done.send(work.await);
        });
        if !spawned {
            return None;
        }
        answer.await.ok()
    }
}

fn stopping() -> McpError {
    McpError::internal_error("the daemon is stopping", None)
}

/// The transport, ready to mount with `.service(service.clone().scope_with_path(PATH))`;
/// clone it per worker so every worker shares one session table.
pub fn http_service(
    shared: McpShared,
    settings: &McpSettings,
) -> StreamableHttpService<MultiplexMcp, LocalSessionManager> {
    let origins: Vec<String> = LOOPBACK_ORIGINS
        .iter()
        .map(|origin| origin.to_string())
        .chain(settings.allowed_origins.iter().cloned())
        .collect();
    let hosts: Vec<String> = LOOPBACK_HOSTS
        .iter()
        .map(|host| host.to_string())
        .chain(settings.allowed_hosts.iter().cloned())
        .collect();
    StreamableHttpService::builder()
        .service_factory(Arc::new(move || Ok(MultiplexMcp::new(shared.clone()))))
        .session_manager(Arc::new(LocalSessionManager::default()))
        .allowed_origins(origins)
        .allowed_hosts(hosts)
        .on_request_fn(authorize)
        .build()
}

/// The auth hook: every MCP request passes here before rmcp sees it, already authenticated
/// by the HTTP layer (a request without a valid token never gets here: 401 with
/// `WWW-Authenticate: Bearer`). It hands the [`Caller`] to the request's handler, where
/// [`MultiplexMcp::call_tool`] checks each tool's role. A request that somehow carries no
/// caller hands none on, and every tool that needs a role refuses it.
fn authorize(request: &HttpRequest, extensions: &mut rmcp::model::Extensions) {
    let caller = request.extensions().get::<Caller>().cloned();
    debug!(method = %request.method(), peer = ?request.peer_addr(),
        role = caller.as_ref().map(|c| c.role.as_str()), "MCP request");
    if let Some(caller) = caller {
        extensions.insert(caller);
    }
    let info = request.connection_info();
    extensions.insert(LinkBase(
        format!("{}://{}", info.scheme(), info.host()).into(),
    ));
}

/// The daemon's address as this request reached it, for absolute artifact links: the bound
/// address (`0.0.0.0:7700` on a daemon serving the network) is no address a client can use.
/// rmcp has already checked the `Host` it comes from against the allowed hosts.
#[derive(Clone)]
struct LinkBase(Arc<str>);

/// The tool error for a caller whose role is too low for `tool`.
fn forbidden(tool: &str, needed: Role, caller: Option<&Caller>) -> CallToolResponse {
    let held = caller.map_or("no".to_string(), |c| format!("the {}", c.role));
    let message = format!("{tool} needs the {needed} role; this token has {held} role");
    debug!(tool, token = ?caller.and_then(|c| c.token.as_deref()), "MCP tool refused");
    tools::ToolError::Api(crate::http::ApiError::Forbidden(message))
        .into_result()
        .into()
}

/// One MCP session's handler (rmcp makes one per session, or per request when stateless).
pub struct MultiplexMcp {
    shared: McpShared,
    /// URIs this session subscribed to with `resources/subscribe`.
    subscribed: Arc<Mutex<HashSet<String>>>,
    /// Set once the session's notifier task runs.
    notifier: Mutex<Option<DropGuard>>,
}

impl MultiplexMcp {
    pub fn new(shared: McpShared) -> MultiplexMcp {
        MultiplexMcp {
            shared,
            subscribed: Arc::default(),
            notifier: Mutex::new(None),
        }
    }

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // Inserting or removing one string cannot leave the set inconsistent.
        self.subscribed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts, once per session, the task that turns activity into
    /// `notifications/resources/updated` for the session's subscriptions. The task ends with
    /// the session (dropping the handler cancels it) or when the client is gone.
    fn ensure_notifier(&self, peer: Peer<RoleServer>) {
        let mut notifier = self
            .notifier
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if notifier.is_some() {
            return;
        }
        let stop = CancellationToken::new();
        *notifier = Some(stop.clone().drop_guard());
        let events = self.shared.feed.subscribe();
        let subscribed = self.subscribed.clone();
        tokio::spawn(async move {
            let sink = |uri: String| {
                let peer = peer.clone();
                async move {
                    let param = rmcp::model::ResourceUpdatedNotificationParam::new(uri);
                    peer.notify_resource_updated(param).await.is_ok()
                }
            };
            let wanted = move |uri: &str| {
                subscribed
                    .lock()
                    .map(|set| set.contains(uri))
                    .unwrap_or(false)
            };
            notify_updates(events, stop, wanted, sink).await;
        });
    }
}

/// Sends one update per changed, wanted URI for every event, until `stop` or until `send`
/// reports the client gone. A lagging receiver updates everything wanted it may have missed.
async fn notify_updates<W, S, F>(
    mut events: broadcast::Receiver<multiplex_actors::activity::ActivityEvent>,
    stop: CancellationToken,
    wanted: W,
    send: S,
) where
    W: Fn(&str) -> bool,
    S: Fn(String) -> F,
    F: std::future::Future<Output = bool>,
{
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.recv() => event,
        };
        let uris = match event {
            Ok(event) => resources::affected(&event),
            // Missed events: say the cluster changed; run resources are re-read on their
            // next update.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                vec![resources::CLUSTER_STATUS.to_string()]
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for uri in uris.into_iter().filter(|uri| wanted(uri)) {
            if !send(uri).await {
                debug!("MCP client gone; resource notifier ends");
                return;
            }
        }
    }
}

impl ServerHandler for MultiplexMcp {
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_resources()
            .enable_resources_subscribe()
            .build();
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("multiplex", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(tools::list()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let http = rmcp_actix_web::transport::on_request_extensions(&context.extensions);
        let base_url = http
            .and_then(|extensions| extensions.get::<LinkBase>())
            .map_or_else(|| self.shared.base_url.clone(), |link| link.0.clone());
        let ctx = ToolContext {
            cluster: self.shared.cluster.clone(),
            feed: self.shared.feed.clone(),
            base_url,
            peer: context.peer.clone(),
            progress: context.meta.get_progress_token(),
        };
        let name = request.name.to_string();
        if let Some(needed) = tools::required_role(&name) {
            let caller = http.and_then(|extensions| extensions.get::<Caller>());
            if !caller.is_some_and(|caller| caller.may(needed)) {
                return Ok(forbidden(&name, needed, caller));
            }
        }
        let tool = name.clone();
        let work = self
            .shared
            .on_actix(async move { tools::call(&tool, request.arguments, ctx).await });
        let outcome = tokio::select! {
            outcome = work => outcome.ok_or_else(stopping)?,
            _ = context.ct.cancelled() => {
                info!(tool = %name, "MCP tool call cancelled by the client");
                return Err(McpError::internal_error("the request was cancelled", None));
            }
        };
        match outcome {
            None => Err(McpError::invalid_params(
                format!("unknown tool: {name}"),
                Some(serde_json::json!({"tool": name})),
            )),
            Some(Ok(value)) => Ok(tools::success(value).into()),
            Some(Err(err)) => {
                debug!(tool = %name, error = %err, "MCP tool error");
                Ok(err.into_result().into())
            }
        }
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        Ok(ListResourcesResult::with_all_items(resources::list()))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        Ok(ListResourceTemplatesResult::with_all_items(
            resources::templates(),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let cluster = self.shared.cluster.clone();
        let uri = request.uri.clone();
        let read = self
            .shared
            .on_actix(async move { resources::read(&cluster, &uri).await })
            .await
            .ok_or_else(stopping)?;
        match read {
            Ok(result) => Ok(result.into()),
            Err(resources::ResourceError::Unknown(uri)) => Err(McpError::resource_not_found(
                format!("no resource {uri}"),
                Some(serde_json::json!({"uri": uri})),
            )),
            Err(resources::ResourceError::Api(err)) => Err(resource_error(err, &request.uri)),
        }
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        let mut accepted = requested.clone();
        accepted.resource_subscriptions = requested.resource_subscriptions.as_ref().map(|uris| {
            uris.iter()
                .filter(|uri| resources::known(uri))
                .cloned()
                .collect()
        });
        Some(accepted)
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let wanted: HashSet<String> = context
            .accepted()
            .resource_subscriptions
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let stop = CancellationToken::new();
        let events = self.shared.feed.subscribe();
        let sink = context.sink().clone();
        let updates = notify_updates(
            events,
            stop.clone(),
            |uri| wanted.contains(uri),
            |uri| {
                let sink = sink.clone();
                async move { sink.notify_resource_updated(uri).await.is_ok() }
            },
        );
        tokio::select! {
            _ = updates => {}
            _ = context.cancelled() => stop.cancel(),
        }
        Ok(())
    }

    #[allow(deprecated)]
    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        if !resources::known(&request.uri) {
            return Err(McpError::resource_not_found(
                format!("no resource {}", request.uri),
                Some(serde_json::json!({"uri": request.uri})),
            ));
        }
        debug!(uri = %request.uri, "MCP subscribe");
        self.subscriptions().insert(request.uri);
        self.ensure_notifier(context.peer);
        Ok(())
    }

    #[allow(deprecated)]
    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.subscriptions().remove(&request.uri);
        Ok(())
    }
}

/// A resource read the cluster refused: not found stays "resource not found", with the REST
/// message.
fn resource_error(err: crate::http::ApiError, uri: &str) -> McpError {
    let data = Some(serde_json::json!({"uri": uri, "error": err.code()}));
    match err {
        crate::http::ApiError::NotFound(_) => McpError::resource_not_found(err.to_string(), data),
        _ => McpError::internal_error(err.to_string(), data),
    }
}

/// Lets clients that accept only one of `application/json` and `text/event-stream` talk to
/// rmcp, which wants both on a POST: the missing type is added before rmcp sees the request,
/// and for a JSON-only client an SSE answer is collected into its one JSON-RPC response
/// (notifications sent before it are dropped: such a client cannot receive them anyway).
pub async fn accept_shim(
    mut request: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::http::header::{HeaderValue, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
    let accept = request
        .headers()
        .get(ACCEPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let json = accept.contains("application/json") || accept.contains("*/*");
    let sse = accept.contains("text/event-stream");
    let post = request.method() == actix_web::http::Method::POST;
    let json_only = post && json && !sse;
    if post && (json != sse) {
        request.headers_mut().insert(
            ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
    }
    let response = next.call(request).await?.map_into_boxed_body();
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"));
    if !(json_only && is_sse) {
        return Ok(response);
    }
    let (request, response) = response.into_parts();
    let (mut head, body) = response.into_parts();
    let bytes = actix_web::body::to_bytes(body)
        .await
        .map_err(|err| actix_web::error::ErrorInternalServerError(err.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    let answer = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
        .rfind(|data| data.contains("\"id\"") && !data.contains("\"method\""))
        .unwrap_or("")
        .to_string();
    head.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    head.headers_mut().remove(CONTENT_LENGTH);
    let response = head.set_body(actix_web::body::BoxBody::new(answer));
    Ok(actix_web::dev::ServiceResponse::new(request, response))
}

/// Answers a POST body that is not a JSON-RPC message the way JSON-RPC says to: HTTP 400
/// with an error response, -32700 (Parse error) when the body is not JSON at all and -32600
/// (Invalid Request) when it is JSON but no request, notification or response, echoing the
/// id when one can be read. rmcp answers both with a plain-text 415, which clients cannot
/// tell from a wrong Content-Type. Every other request reaches rmcp as it came, its body put
/// back as read; a wrong Content-Type is still rmcp's to refuse.
pub async fn jsonrpc_errors(
    mut request: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::http::header::CONTENT_TYPE;
    let json_body = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.split(';').next().unwrap_or("").trim())
        .is_some_and(|essence| essence.eq_ignore_ascii_case("application/json"));
    if request.method() != actix_web::http::Method::POST || !json_body {
        return Ok(next.call(request).await?.map_into_boxed_body());
    }
    // Bounded by the app's `PayloadConfig`, the daemon's `max_body_bytes`.
    let body = request.extract::<actix_web::web::Bytes>().await?;
    if let Some(error) = not_a_message(&body) {
        debug!(code = %error["error"]["code"], "MCP body is not a JSON-RPC message");
        let response = actix_web::HttpResponse::BadRequest().json(error);
        return Ok(request.into_response(response));
    }
    request.set_payload(actix_web::dev::Payload::from(body));
    Ok(next.call(request).await?.map_into_boxed_body())
}

/// The JSON-RPC error response for a body rmcp cannot take as a message, or `None` when it
/// can (parsed the way rmcp parses it, so the two never disagree).
fn not_a_message(body: &[u8]) -> Option<serde_json::Value> {
    use serde_json::{json, Value};
    if serde_json::from_slice::<rmcp::model::ClientJsonRpcMessage>(body).is_ok() {
        return None;
    }
    let (code, message, id) = match serde_json::from_slice::<Value>(body) {
        Err(err) => (
            -32700,
            format!("Parse error: the body is not JSON ({err})"),
            Value::Null,
        ),
        Ok(value) => {
            // JSON-RPC: an id that cannot be read is answered as null.
            let id = value
                .get("id")
                .filter(|id| id.is_string() || id.is_number())
                .cloned()
                .unwrap_or(Value::Null);
            let message = "Invalid Request: the body is JSON but not a JSON-RPC 2.0 request, \
                notification or response (an object with \"jsonrpc\": \"2.0\" and a string \
                \"method\", or a result or error for an \"id\")";
            (-32600, message.to_string(), id)
        }
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
}
