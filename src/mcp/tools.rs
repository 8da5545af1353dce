//! The MCP tools: their schemas, their arguments and what each does with the cluster.
//!
//! Schemas are written out by hand rather than derived, so each field carries the
//! description and bounds a model needs to fill it in, and stays stable when Rust types
//! change. Arguments are parsed with serde against the same shapes; a bad argument is a tool
//! error (`isError: true`) whose text says which field is wrong, and every failure the
//! cluster reports carries the REST API's code and message (and every validation issue),
//! through [`ApiError`].

use std::time::Duration;

use multiplex_actors::activity::{Activity, ActivityEvent, EventsSince, Filter};
use multiplex_actors::cluster::{Cluster, ClusterError};
use multiplex_actors::lease::{LeaseRequest, MAX_LEASE, MAX_LEASE_NODES};
use multiplex_actors::store::{RunRecord, RunState};
use multiplex_actors::workflow::TemplateKind;
use rmcp::model::{CallToolResult, ProgressNotificationParam, ProgressToken, Tool};
use rmcp::service::{Peer, RoleServer};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tracing::{debug, info};

use super::feed::ActivityFeed;
use crate::auth::Role;
use crate::http::{run_view, ApiError};

/// How long a progress follower waits for its run's activity before it reads the run
/// itself.
const FOLLOWER_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest a `submit_workflow` call with a progress token follows its run, by default.
const DEFAULT_FOLLOW_SECS: u64 = 600;
/// Upper bound on `wait_seconds`.
const MAX_FOLLOW_SECS: u64 = 3600;
/// Most events one `stream_activity` call returns.
const MAX_EVENTS: usize = 500;

/// Every tool, as `tools/list` answers.
pub fn list() -> Vec<Tool> {
    [
        submit_workflow_tool(),
        get_workflow_status_tool(),
        cancel_workflow_tool(),
        allocate_tool(),
        release_tool(),
        stream_activity_tool(),
        list_nodes_tool(),
    ]
    .into_iter()
    .filter_map(|value| match serde_json::from_value::<Tool>(value) {
        Ok(tool) => Some(tool),
        Err(err) => {
            // Only a typo in the literals below can get here; tests list every tool.
            tracing::error!(error = %err, "an MCP tool definition does not parse");
            None
        }
    })
    .collect()
}

/// Tools a viewer may call: they only read (each carries `readOnlyHint`).
const READ_ONLY: [&str; 3] = ["get_workflow_status", "stream_activity", "list_nodes"];

/// The role a tool needs, `None` for a name that is no tool. Everything not read-only
/// (submit, cancel, leases) takes an operator.
pub fn required_role(name: &str) -> Option<Role> {
    if READ_ONLY.contains(&name) {
        Some(Role::Viewer)
    } else if list().iter().any(|tool| tool.name == name) {
        Some(Role::Operator)
    } else {
        None
    }
}

/// The run view every run-returning tool answers with (`id`, `state`, steps, errors and
/// artifact links).
fn run_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "state": {"type": "string",
                      "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "steps": {"type": "array", "items": {"type": "object"}},
            "error": {"type": ["string", "null"]},
        },
        "required": ["id", "state", "steps"],
    })
}

fn submit_workflow_tool() -> Value {
    json!({
        "name": "submit_workflow",
        "title": "Submit a workflow",
        "description": "Run a workflow on the GPU cluster. Give either `workflow` (a full \
            workflow document: {name, nodes: [{id, type, data}], edges: [{id, source, target, \
            targetHandle?}], options?}; step types intent, image, video, narration, output, \
            comfyui, langflow) or `template` plus `parameters` (one step built from a \
            template; read the multiplex://templates resource for names and parameters). \
            The run is validated first and every problem is reported at once. Answers the \
            run id and state. With a progress token, progress notifications follow the run \
            until it ends (at most `wait_seconds`) and the answer is the state it reached.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "workflow": {
                    "type": "object",
                    "description": "The workflow document, exactly as POST /api/workflows \
                        takes it (docs/workflows.md).",
                    "properties": {
                        "name": {"type": "string"},
                        "nodes": {"type": "array", "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "type": {"type": "string", "enum": ["intent", "image",
                                    "video", "narration", "output", "comfyui", "langflow"]},
                                "data": {"type": "object"}
                            },
                            "required": ["id", "type"]
                        }},
                        "edges": {"type": "array", "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "source": {"type": "string"},
                                "target": {"type": "string"},
                                "sourceHandle": {"type": "string"},
                                "targetHandle": {"type": "string"}
                            },
                            "required": ["id", "source", "target"]
                        }},
                        "options": {"type": "object"}
                    },
                    "required": ["nodes"]
                },
                "template": {
                    "type": "string",
                    "description": "A template name (see multiplex://templates), instead of \
                        `workflow`: runs one step of that template."
                },
                "parameters": {
                    "type": "object",
                    "description": "The template's parameter values, e.g. {\"prompt\": \"a \
                        lighthouse at dusk\", \"width\": 1024}. Only with `template`.",
                    "additionalProperties": true
                },
                "name": {"type": "string", "description": "Run name (template runs only)."},
                "lease": {
                    "type": "string",
                    "description": "A lease id from allocate_gpu_resources: every step runs \
                        only on the leased nodes."
                },
                "wait_seconds": {
                    "type": "integer", "minimum": 1, "maximum": MAX_FOLLOW_SECS,
                    "description": "With a progress token: longest time to follow the run \
                        (default 600)."
                }
            }
        },
        "outputSchema": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "state": {"type": "string"},
                "finished": {"type": "boolean"},
                "run": run_schema()
            },
            "required": ["id", "state", "run"]
        }
    })
}

fn id_schema(what: &str) -> Value {
    json!({
        "type": "object",
        "properties": {"id": {"type": "string", "description": what}},
        "required": ["id"]
    })
}

fn get_workflow_status_tool() -> Value {
    json!({
        "name": "get_workflow_status",
        "title": "Workflow status",
        "description": "The run's state, every step (state, node, attempts, progress, error) \
            and links to the artifacts produced so far.",
        "inputSchema": id_schema("The run id submit_workflow answered."),
        "outputSchema": run_schema(),
        "annotations": {"readOnlyHint": true}
    })
}

fn cancel_workflow_tool() -> Value {
    json!({
        "name": "cancel_workflow",
        "title": "Cancel a workflow",
        "description": "Cancel a live run: queued steps are dropped and running prompts \
            interrupted. Answers the run; an error when the run has already ended.",
        "inputSchema": id_schema("The run id."),
        "outputSchema": run_schema(),
        "annotations": {"destructiveHint": true, "idempotentHint": true}
    })
}

fn lease_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "nodes": {"type": "array", "items": {"type": "string"}},
            "expires_at": {"type": "string", "format": "date-time"},
            "vram_mb": {"type": "integer"}
        },
        "required": ["id", "nodes", "expires_at"]
    })
}

fn allocate_tool() -> Value {
    json!({
        "name": "allocate_gpu_resources",
        "title": "Lease GPU nodes",
        "description": "Reserve `count` available nodes that have a capability or model and \
            a card with `vram_mb` MiB, for `duration_seconds`. While the lease lives, runs \
            submitted with its id run only on those nodes and other runs are kept off them. \
            Release it with release_lease (or call again with `release`: the lease id); it \
            also ends by itself at expires_at.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "capability": {"type": "string", "description": "A node capability: image, \
                    video, comfyui (any ComfyUI node) or a LangFlow flow alias such as \
                    narration-text (see multiplex://capabilities)."},
                "model": {"type": "string", "description": "A model file a node lists, e.g. \
                    flux1-dev.safetensors."},
                "vram_mb": {"type": "integer", "minimum": 0, "default": 0,
                            "description": "VRAM needed on one card, in MiB."},
                "count": {"type": "integer", "minimum": 1, "maximum": MAX_LEASE_NODES,
                          "default": 1, "description": "How many nodes."},
                "duration_seconds": {"type": "integer", "minimum": 1,
                    "maximum": MAX_LEASE.as_secs(), "default": 600,
                    "description": "How long the lease lasts."},
                "release": {"type": "string", "description": "Instead of leasing: the id of \
                    a lease to release now."}
            }
        },
        "outputSchema": lease_schema()
    })
}

fn release_tool() -> Value {
    json!({
        "name": "release_lease",
        "title": "Release a lease",
        "description": "End a lease from allocate_gpu_resources now; its nodes take any work \
            again.",
        "inputSchema": id_schema("The lease id."),
        "outputSchema": lease_schema(),
        "annotations": {"idempotentHint": false}
    })
}

fn stream_activity_tool() -> Value {
    json!({
        "name": "stream_activity",
        "title": "Activity since a cursor",
        "description": "Cluster events (run and step states, progress, notices, node \
            availability) after `cursor`, oldest first, and `next_cursor` to pass next time. \
            Start with cursor 0. The daemon keeps the most recent 2048 events.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "cursor": {"type": "integer", "minimum": 0, "default": 0,
                           "description": "The next_cursor of the previous call, or 0."},
                "run_id": {"type": "string", "description": "Only this run's events."},
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS,
                          "default": 100},
                "include_previews": {"type": "boolean", "default": false,
                    "description": "Include step_preview events (base64 images)."}
            }
        },
        "outputSchema": {
            "type": "object",
            "properties": {
                "events": {"type": "array", "items": {"type": "object"}},
                "next_cursor": {"type": "integer"},
                "latest": {"type": "integer"}
            },
            "required": ["events", "next_cursor", "latest"]
        },
        "annotations": {"readOnlyHint": true}
    })
}

fn list_nodes_tool() -> Value {
    json!({
        "name": "list_nodes",
        "title": "List nodes",
        "description": "Every GPU node: availability (and why not), slots, running tasks, \
            services, capabilities, GPUs, VRAM, recently loaded models, and live leases.",
        "inputSchema": {"type": "object", "properties": {}},
        "outputSchema": {
            "type": "object",
            "properties": {
                "nodes": {"type": "array", "items": {"type": "object"}},
                "leases": {"type": "array", "items": lease_schema()}
            },
            "required": ["nodes"]
        },
        "annotations": {"readOnlyHint": true}
    })
}

/// Why a tool call failed: a REST-equivalent error, or an argument that does not fit.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("invalid arguments: {0}")]
    Arguments(String),
}

impl From<ClusterError> for ToolError {
    fn from(err: ClusterError) -> ToolError {
        ToolError::Api(err.into())
    }
}

impl ToolError {
    /// The MCP tool error: text for the model (every issue listed), and the REST body as
    /// structured content.
    pub fn into_result(self) -> CallToolResult {
        let (body, mut text) = match &self {
            ToolError::Api(api) => {
                let mut body = json!({"error": api.code(), "message": api.to_string()});
                if let ApiError::Invalid(issues) = api {
                    body["issues"] = json!(issues);
                }
                (body, api.to_string())
            }
            ToolError::Arguments(_) => (
                json!({"error": "bad_request", "message": self.to_string()}),
                self.to_string(),
            ),
        };
        if let ToolError::Api(ApiError::Invalid(issues)) = &self {
            for issue in issues {
                text.push_str(&format!(
                    "\n- {}",
                    serde_json::to_string(issue).unwrap_or_default()
                ));
            }
        }
        let result = json!({
            "resultType": "complete",
            "content": [{"type": "text", "text": text}],
            "structuredContent": body,
            "isError": true,
        });
        serde_json::from_value(result)
            .unwrap_or_else(|_| CallToolResult::error(vec![rmcp::model::ContentBlock::text(text)]))
    }
}

/// A successful structured result (the JSON also goes in a text block for older clients).
pub fn success(value: Value) -> CallToolResult {
    CallToolResult::structured(value)
}

fn parse<T: DeserializeOwned>(arguments: Option<rmcp::model::JsonObject>) -> Result<T, ToolError> {
    let value = Value::Object(arguments.unwrap_or_default());
    serde_json::from_value(value).map_err(|err| ToolError::Arguments(err.to_string()))
}

/// What a tool call can use.
pub struct ToolContext {
    pub cluster: Cluster,
    pub feed: ActivityFeed,
    pub base_url: std::sync::Arc<str>,
    pub peer: Peer<RoleServer>,
    pub progress: Option<ProgressToken>,
}

impl ToolContext {
    fn view(&self, record: &RunRecord) -> Value {
        let mut view = run_view(record);
        if let Some(steps) = view.get_mut("steps").and_then(Value::as_array_mut) {
            for step in steps {
                let artifacts = step.get_mut("artifacts").and_then(Value::as_array_mut);
                for artifact in artifacts.into_iter().flatten() {
                    if let Some(url) = artifact.get("url").and_then(Value::as_str) {
                        artifact["href"] = json!(format!("{}{url}", self.base_url));
                    }
                }
            }
        }
        view
    }
}

/// Runs one tool; `None` when no tool has that name.
pub async fn call(
    name: &str,
    arguments: Option<rmcp::model::JsonObject>,
    ctx: ToolContext,
) -> Option<Result<Value, ToolError>> {
    let result = match name {
        "submit_workflow" => submit_workflow(parse(arguments), &ctx).await,
        "get_workflow_status" => match parse::<IdArgs>(arguments) {
            Ok(args) => ctx
                .cluster
                .run(&args.id)
                .await
                .map(|record| ctx.view(&record))
                .map_err(ToolError::from),
            Err(err) => Err(err),
        },
        "cancel_workflow" => match parse::<IdArgs>(arguments) {
            Ok(args) => {
                info!(run_id = %args.id, "MCP cancel");
                ctx.cluster
                    .cancel(&args.id)
                    .await
                    .map(|record| ctx.view(&record))
                    .map_err(ToolError::from)
            }
            Err(err) => Err(err),
        },
        "allocate_gpu_resources" => allocate(parse(arguments), &ctx).await,
        "release_lease" => match parse::<IdArgs>(arguments) {
            Ok(args) => release(&args.id, &ctx),
            Err(err) => Err(err),
        },
        "stream_activity" => stream_activity(parse(arguments), &ctx).await,
        "list_nodes" => match ctx.cluster.nodes().await {
            Ok(nodes) => Ok(json!({"nodes": nodes, "leases": ctx.cluster.leases()})),
            Err(err) => Err(err.into()),
        },
        _ => return None,
    };
    Some(result)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdArgs {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitArgs {
    workflow: Option<serde_json::Map<String, Value>>,
    template: Option<String>,
    parameters: Option<serde_json::Map<String, Value>>,
    name: Option<String>,
    lease: Option<String>,
    wait_seconds: Option<u64>,
}

async fn submit_workflow(
    args: Result<SubmitArgs, ToolError>,
    ctx: &ToolContext,
) -> Result<Value, ToolError> {
    let args = args?;
    let document = match (&args.workflow, &args.template) {
        (Some(workflow), None) => {
            if args.parameters.is_some() || args.name.is_some() {
                return Err(ToolError::Arguments(
                    "`parameters` and `name` go with `template`, not `workflow`".into(),
                ));
            }
            Value::Object(workflow.clone())
        }
        (None, Some(template)) => template_workflow(&ctx.cluster, template, &args)?,
        _ => {
            return Err(ToolError::Arguments(
                "give exactly one of `workflow` (a workflow document) or `template` (a \
                 template name, with `parameters`)"
                    .into(),
            ))
        }
    };
    // Listen before submitting, so no event of the run can slip past.
    let events = ctx.progress.as_ref().map(|_| ctx.feed.subscribe());
    let record = ctx
        .cluster
        .submit_leased(document, args.lease.as_deref())
        .await?;
    info!(run_id = %record.id, lease = ?args.lease, "MCP submit");
    let (Some(token), Some(events)) = (ctx.progress.clone(), events) else {
        return Ok(
            json!({"id": record.id, "state": record.state, "finished": false,
                         "run": ctx.view(&record)}),
        );
    };
    let wait = args
        .wait_seconds
        .unwrap_or(DEFAULT_FOLLOW_SECS)
        .clamp(1, MAX_FOLLOW_SECS);
    let follower = Follower {
        ctx,
        token,
        run_id: record.id.clone(),
        steps: record.steps.len().max(1),
    };
    let finished = tokio::time::timeout(Duration::from_secs(wait), follower.follow(events))
        .await
        .is_ok();
    let record = ctx.cluster.run(&record.id).await?;
    Ok(
        json!({"id": record.id, "state": record.state, "finished": finished,
              "run": ctx.view(&record)}),
    )
}

/// A one-step workflow from a template: an `image` or `video` step for templates of those
/// kinds, a `comfyui` step for generic ones. Whatever is wrong with the parameters is left
/// to validation, so the answer lists every issue the same way a document would.
fn template_workflow(
    cluster: &Cluster,
    template: &str,
    args: &SubmitArgs,
) -> Result<Value, ToolError> {
    let Some(found) = cluster.catalog().templates().get(template) else {
        let known: Vec<&str> = cluster
            .catalog()
            .templates()
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        return Err(ToolError::Arguments(format!(
            "no template named {template:?}; known templates: {}",
            known.join(", ")
        )));
    };
    let parameters = args.parameters.clone().unwrap_or_default();
    let (kind, data) = match found.kind {
        TemplateKind::Image | TemplateKind::Video => {
            let mut data = parameters;
            data.insert("template".into(), json!(template));
            let kind = if found.kind == TemplateKind::Image {
                "image"
            } else {
                "video"
            };
            (kind, Value::Object(data))
        }
        TemplateKind::Generic => (
            "comfyui",
            json!({"template": template, "parameters": parameters}),
        ),
    };
    let name = args.name.clone().unwrap_or_else(|| template.to_string());
    Ok(json!({
        "name": name,
        "nodes": [{"id": "step", "type": kind, "data": data}],
        "edges": []
    }))
}

/// Turns a run's activity into progress notifications until the run ends.
struct Follower<'a> {
    ctx: &'a ToolContext,
    token: ProgressToken,
    run_id: String,
    steps: usize,
}

impl Follower<'_> {
    async fn follow(&self, mut events: broadcast::Receiver<ActivityEvent>) {
        let mut ended = 0usize;
        let mut sent = 0.0f64;
        // The run may have moved on before the receiver existed; the first notification
        // states where it is.
        if self.already_over().await {
            return;
        }
        loop {
            let next = tokio::time::timeout(FOLLOWER_RECHECK, events.recv()).await;
            let event = match next {
                Ok(Ok(event)) => event,
                // Quiet for a while: the end may have been among events the hub dropped for
                // the feed's full mailbox, which no receiver hears of.
                Err(_quiet) => {
                    if self.already_over().await {
                        return;
                    }
                    continue;
                }
                Ok(Err(broadcast::error::RecvError::Lagged(skipped))) => {
                    debug!(skipped, run_id = %self.run_id, "progress follower lagged");
                    if self.already_over().await {
                        return;
                    }
                    continue;
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return,
            };
            if event.activity.run_id() != Some(self.run_id.as_str()) {
                continue;
            }
            let (progress, message, done) = match &event.activity {
                Activity::StepState { step_id, state, .. } => {
                    if state.is_terminal() {
                        ended += 1;
                    }
                    (
                        ended as f64,
                        format!("step {step_id}: {state:?}").to_lowercase(),
                        false,
                    )
                }
                Activity::StepProgress {
                    step_id,
                    value,
                    max,
                    ..
                } => {
                    let fraction = if *max > 0.0 {
                        (value / max).clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    let at = ended as f64 + fraction.min(0.99);
                    (at, format!("step {step_id}: {value}/{max}"), false)
                }
                Activity::RunState { state, error, .. } => {
                    let over = !matches!(state, RunState::Queued | RunState::Running);
                    let mut message = format!("run {state:?}").to_lowercase();
                    if let Some(error) = error {
                        message.push_str(&format!(": {error}"));
                    }
                    (if over { self.steps as f64 } else { sent }, message, over)
                }
                _ => continue,
            };
            // Progress must increase; a step state behind a progress tick only adds text.
            sent = sent.max(progress.min(self.steps as f64));
            self.notify(sent, message).await;
            if done {
                return;
            }
        }
    }

    async fn already_over(&self) -> bool {
        match self.ctx.cluster.run(&self.run_id).await {
            Ok(record) if record.state.is_terminal() => {
                let message = format!("run {:?}", record.state).to_lowercase();
                self.notify(self.steps as f64, message).await;
                true
            }
            _ => false,
        }
    }

    async fn notify(&self, progress: f64, message: String) {
        let mut param = ProgressNotificationParam::new(self.token.clone(), progress);
        param.total = Some(self.steps as f64);
        param.message = Some(message);
        if let Err(err) = self.ctx.peer.notify_progress(param).await {
            debug!(error = %err, run_id = %self.run_id, "progress notification not sent");
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllocateArgs {
    capability: Option<String>,
    model: Option<String>,
    #[serde(default)]
    vram_mb: u64,
    #[serde(default = "one")]
    count: u32,
    #[serde(default = "ten_minutes")]
    duration_seconds: u64,
    release: Option<String>,
}

fn one() -> u32 {
    1
}

fn ten_minutes() -> u64 {
    600
}

async fn allocate(
    args: Result<AllocateArgs, ToolError>,
    ctx: &ToolContext,
) -> Result<Value, ToolError> {
    let args = args?;
    if let Some(id) = &args.release {
        return release(id, ctx);
    }
    let request = LeaseRequest {
        capability: args.capability,
        model: args.model,
        vram_mb: args.vram_mb,
        count: args.count,
        duration: Duration::from_secs(args.duration_seconds),
    };
    let lease = ctx.cluster.allocate_lease(&request).await?;
    Ok(json!(lease))
}

fn release(id: &str, ctx: &ToolContext) -> Result<Value, ToolError> {
    let lease = ctx.cluster.release_lease(id)?;
    Ok(json!(lease))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivityArgs {
    #[serde(default)]
    cursor: u64,
    run_id: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    include_previews: bool,
}

async fn stream_activity(
    args: Result<ActivityArgs, ToolError>,
    ctx: &ToolContext,
) -> Result<Value, ToolError> {
    let args = args?;
    let limit = args.limit.unwrap_or(100).clamp(1, MAX_EVENTS);
    let filter = match args.run_id {
        Some(id) => Filter::Run(id),
        None => Filter::All,
    };
    let (events, latest) = ctx
        .cluster
        .hub()
        .send(EventsSince {
            after: args.cursor,
            filter,
            limit,
        })
        .await
        .map_err(|_| ToolError::from(ClusterError::ActorGone("activity hub")))?;
    // The cursor moves past everything looked at, previews included, even when they are
    // left out of the answer.
    let next_cursor = if events.len() == limit {
        events.last().map_or(args.cursor, |event| event.seq)
    } else {
        latest.max(args.cursor)
    };
    let events: Vec<&ActivityEvent> = events
        .iter()
        .filter(|event| {
            args.include_previews || !matches!(event.activity, Activity::StepPreview { .. })
        })
        .collect();
    Ok(json!({"events": events, "next_cursor": next_cursor, "latest": latest}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A viewer may call exactly the tools that declare themselves read-only, so a new tool
    /// cannot become callable by viewers without saying it only reads.
    #[test]
    fn viewers_get_exactly_the_read_only_tools() {
        let tools = list();
        assert_eq!(tools.len(), 7, "every tool definition parses");
        for tool in tools {
            let value = serde_json::to_value(&tool).unwrap();
            let read_only = value["annotations"]["readOnlyHint"] == true;
            let expected = if read_only {
                Role::Viewer
            } else {
                Role::Operator
            };
            assert_eq!(required_role(&tool.name), Some(expected), "{}", tool.name);
        }
        assert_eq!(required_role("no_such_tool"), None);
    }
}
