//! The resolved cluster description the actors run with.
//!
//! The daemon reads its TOML file, starts simulators where asked, reads secrets from the
//! environment and hands the actors this resolved form: every service has a URL and every
//! secret is a value. Nothing here reads files or the environment.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use url::Url;

/// Everything the actors need to know about the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Template used by `image` steps that name none.
    pub default_image_template: String,
    /// Template used by `video` steps that name none.
    pub default_video_template: String,
    pub nodes: Vec<NodeConfig>,
    /// How long a node may be away before the work sent to it is placed elsewhere, in
    /// milliseconds. Long enough for a ComfyUI restart, short enough not to stall a run.
    #[serde(default = "default_node_grace_ms")]
    pub node_grace_ms: u64,
}

/// Default of [`ClusterConfig::node_grace_ms`]: 30 seconds.
pub const DEFAULT_NODE_GRACE_MS: u64 = 30_000;

fn default_node_grace_ms() -> u64 {
    DEFAULT_NODE_GRACE_MS
}

/// One GPU box and the services it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Unique name, used in placement decisions, logs and the API.
    pub name: String,
    /// The machine the node runs on, when several nodes share one (e.g. one ComfyUI per GPU
    /// of a three-GPU box); shown to operators only.
    #[serde(default)]
    pub host: Option<String>,
    /// Free text such as "ubuntu" or "windows"; shown to operators only.
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub gpus: Vec<GpuConfig>,
    /// How many tasks the node runs at once; defaults to its GPU count (at least one).
    #[serde(default)]
    pub slots: Option<u32>,
    #[serde(default)]
    pub comfyui: Option<ComfyServiceConfig>,
    #[serde(default)]
    pub langflow: Option<LangflowServiceConfig>,
}

impl NodeConfig {
    /// Concurrent task slots: the configured value, else one per GPU, never zero.
    pub fn slot_count(&self) -> u32 {
        self.slots.unwrap_or(self.gpus.len() as u32).max(1)
    }

    /// Total VRAM over all GPUs, in MiB.
    pub fn total_vram_mb(&self) -> u64 {
        self.gpus.iter().map(|gpu| gpu.vram_mb).sum()
    }

    /// The largest single card's VRAM: a task runs on one card.
    pub fn max_card_vram_mb(&self) -> u64 {
        self.gpus.iter().map(|gpu| gpu.vram_mb).max().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuConfig {
    /// e.g. "RTX A6000".
    pub model: String,
    pub vram_mb: u64,
}

/// A ComfyUI instance on a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComfyServiceConfig {
    /// Base URL as the daemon reaches it, e.g. `http://127.0.0.1:8188`.
    pub url: Url,
    /// What the node is meant for: `image`, `video`. Any ComfyUI node also runs generic
    /// `comfyui` steps.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Model files the node has, used to prefer nodes with a template's model.
    #[serde(default)]
    pub models: Vec<String>,
}

/// A LangFlow instance on a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LangflowServiceConfig {
    pub url: Url,
    /// The `x-api-key` value, already read from the environment. Never logged or shown.
    #[serde(default, skip_serializing)]
    pub api_key: Option<String>,
    /// Flows this instance serves, by our name (e.g. `narration-text`, `narration-visual`,
    /// or any alias a `langflow` step may name).
    #[serde(default)]
    pub flows: BTreeMap<String, FlowConfig>,
}

/// How to call one LangFlow flow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowConfig {
    /// LangFlow's flow id (UUID) or endpoint name, used in `/api/v1/run/{id}`.
    pub id: String,
    /// Component id of the flow's Chat Input, which receives uploaded files (images, videos)
    /// through a `files` tweak. Needed only by flows that take files, e.g. visual narration.
    #[serde(default)]
    pub file_component: Option<String>,
}
