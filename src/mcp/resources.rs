//! The MCP resources: what a client can read (and subscribe to) about the cluster.
//!
//! | URI | name | changes with |
//! |-----|------|--------------|
//! | `multiplex://cluster/status` | gpu_cluster_status | nodes coming and going, runs, placements |
//! | `multiplex://templates` | workflow_templates | nothing while the daemon runs |
//! | `multiplex://capabilities` | model_capabilities | nothing while the daemon runs |
//! | `multiplex://runs/{id}` | workflow_run | every state change and progress tick of that run |
//!
//! [`affected`] maps an activity event to the URIs it changes; the server uses it to send
//! `notifications/resources/updated` to subscribers.

use std::collections::BTreeMap;

use multiplex_actors::activity::{Activity, ActivityEvent};
use multiplex_actors::cluster::Cluster;
use rmcp::model::{ReadResourceResult, Resource, ResourceTemplate};
use serde_json::{json, Value};

use crate::http::{run_view, ApiError};

pub const CLUSTER_STATUS: &str = "multiplex://cluster/status";
pub const TEMPLATES: &str = "multiplex://templates";
pub const CAPABILITIES: &str = "multiplex://capabilities";
pub const RUN_PREFIX: &str = "multiplex://runs/";
const JSON: &str = "application/json";

/// The fixed resources, for `resources/list`.
pub fn list() -> Vec<Resource> {
    let resources = json!([
        {"uri": CLUSTER_STATUS, "name": "gpu_cluster_status", "mimeType": JSON,
         "title": "GPU cluster status",
         "description": "Every node (availability, free slots, VRAM, running tasks), live runs \
            and leases."},
        {"uri": TEMPLATES, "name": "workflow_templates", "mimeType": JSON,
         "title": "Workflow templates",
         "description": "Templates submit_workflow can run by name, with their parameters \
            (type, default, bounds, choices)."},
        {"uri": CAPABILITIES, "name": "model_capabilities", "mimeType": JSON,
         "title": "Model capabilities",
         "description": "Which nodes serve each capability and model, and their VRAM."},
    ]);
    serde_json::from_value(resources).unwrap_or_default()
}

/// The run template, for `resources/templates/list`.
pub fn templates() -> Vec<ResourceTemplate> {
    let templates = json!([
        {"uriTemplate": "multiplex://runs/{id}", "name": "workflow_run", "mimeType": JSON,
         "title": "Workflow run",
         "description": "One run: state, steps, errors and artifact links, as \
            get_workflow_status answers."}
    ]);
    serde_json::from_value(templates).unwrap_or_default()
}

/// Why a resource cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("no resource {0}")]
    Unknown(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// Reads one resource.
pub async fn read(cluster: &Cluster, uri: &str) -> Result<ReadResourceResult, ResourceError> {
    let value = match uri {
        CLUSTER_STATUS => cluster_status(cluster).await?,
        TEMPLATES => templates_json(cluster),
        CAPABILITIES => capabilities_json(cluster),
        _ => match uri.strip_prefix(RUN_PREFIX) {
            Some(id) if !id.is_empty() && !id.contains('/') => {
                let record = cluster.run(id).await.map_err(ApiError::from)?;
                run_view(&record)
            }
            _ => return Err(ResourceError::Unknown(uri.to_string())),
        },
    };
    let text = serde_json::to_string_pretty(&value).unwrap_or_default();
    // `resultType` is required at 2026-07-28; rmcp drops it for older peers.
    let result = json!({"resultType": "complete",
                        "contents": [{"uri": uri, "mimeType": JSON, "text": text}]});
    serde_json::from_value(result).map_err(|err| ApiError::Internal(err.to_string()).into())
}

/// Whether a URI names something [`read`] can read (subscriptions to others are refused).
pub fn known(uri: &str) -> bool {
    matches!(uri, CLUSTER_STATUS | TEMPLATES | CAPABILITIES)
        || uri
            .strip_prefix(RUN_PREFIX)
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// The resource URIs an event changes.
pub fn affected(event: &ActivityEvent) -> Vec<String> {
    match &event.activity {
        Activity::NodeState { .. } | Activity::TunnelState { .. } => {
            vec![CLUSTER_STATUS.to_string()]
        }
        Activity::RunSubmitted { run_id, .. }
        | Activity::RunState { run_id, .. }
        | Activity::StepState { run_id, .. } => {
            vec![format!("{RUN_PREFIX}{run_id}"), CLUSTER_STATUS.to_string()]
        }
        Activity::StepProgress { run_id, .. } | Activity::StepNotice { run_id, .. } => {
            vec![format!("{RUN_PREFIX}{run_id}")]
        }
        // Previews are not part of any resource.
        Activity::StepPreview { .. } => Vec::new(),
    }
}

async fn cluster_status(cluster: &Cluster) -> Result<Value, ApiError> {
    let nodes = cluster.nodes().await.map_err(ApiError::from)?;
    Ok(json!({
        "nodes_total": nodes.len(),
        "nodes_available": nodes.iter().filter(|node| node.available).count(),
        "live_runs": cluster.live_runs(),
        "nodes": nodes,
        "leases": cluster.leases(),
    }))
}

fn templates_json(cluster: &Cluster) -> Value {
    let templates: Vec<Value> = cluster
        .catalog()
        .templates()
        .iter()
        .map(|template| {
            let parameters: BTreeMap<&String, Value> = template
                .parameters
                .iter()
                .map(|(name, spec)| {
                    let mut value = json!({
                        "type": spec.ty,
                        "required": spec.required,
                        "default": spec.default,
                        "min": spec.min,
                        "max": spec.max,
                        "multiple_of": spec.multiple_of,
                        "description": spec.description,
                        "from_upstream_text": spec.source.is_some(),
                    });
                    if !spec.choices.is_empty() {
                        value["choices"] = json!(spec.choices);
                    }
                    if let Some(object) = value.as_object_mut() {
                        object.retain(|_, field| !field.is_null());
                    }
                    (name, value)
                })
                .collect();
            json!({
                "name": template.name,
                "kind": template.kind,
                "description": template.description,
                "output": template.output,
                "models": template.models,
                "vram_mb": template.vram_mb,
                "step_type": match template.kind {
                    multiplex_actors::workflow::TemplateKind::Image => "image",
                    multiplex_actors::workflow::TemplateKind::Video => "video",
                    multiplex_actors::workflow::TemplateKind::Generic => "comfyui",
                },
                "parameters": parameters,
            })
        })
        .collect();
    json!({"templates": templates})
}

fn capabilities_json(cluster: &Cluster) -> Value {
    let mut capabilities: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut models: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in cluster.catalog().nodes() {
        let entry = json!({"node": node.name, "max_card_vram_mb": node.max_card_vram_mb()});
        if let Some(comfy) = &node.comfyui {
            let generic = multiplex_actors::workflow::GENERIC_COMFY.to_string();
            for capability in comfy.capabilities.iter().chain(std::iter::once(&generic)) {
                capabilities
                    .entry(capability.clone())
                    .or_default()
                    .push(json!({"service": "comfyui", "node": entry["node"],
                                 "max_card_vram_mb": entry["max_card_vram_mb"]}));
            }
            for model in &comfy.models {
                models
                    .entry(model.clone())
                    .or_default()
                    .push(node.name.clone());
            }
        }
        if let Some(langflow) = &node.langflow {
            for flow in langflow.flows.keys() {
                capabilities
                    .entry(flow.clone())
                    .or_default()
                    .push(json!({"service": "langflow", "node": entry["node"],
                                 "max_card_vram_mb": entry["max_card_vram_mb"]}));
            }
        }
    }
    json!({
        "capabilities": capabilities,
        "models": models,
        "default_image_template": cluster.catalog().default_image_template(),
        "default_video_template": cluster.catalog().default_video_template(),
    })
}
