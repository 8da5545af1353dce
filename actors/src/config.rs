//! The resolved cluster description the actors run with.
//!
//! The daemon reads its TOML file, starts simulators where asked, reads secrets from the
//! environment and hands the actors this resolved form: every service has a URL and every
//! secret is a value. Nothing here reads files or the environment.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    /// Most steps (nodes) a workflow may have; larger documents are refused at validation.
    /// A run's record holds every step and is rewritten whole on each step's transition, so
    /// the bytes written grow with the square of the step count (5000 steps wrote 11 GB).
    #[serde(default = "default_max_steps")]
    pub max_steps: usize,
}

/// Default of [`ClusterConfig::max_steps`]: far more than a canvas shows, few enough that
/// a run's writes stay in megabytes.
pub const DEFAULT_MAX_STEPS: usize = 500;

fn default_max_steps() -> usize {
    DEFAULT_MAX_STEPS
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
    /// How the daemon reaches the box through SSH, when it does: the node's services whose
    /// `forward` names one of this tunnel's forwards are reached at its local end.
    #[serde(default)]
    pub ssh: Option<SshConfig>,
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
    /// The SSH forward (by name) this service is reached through; its `url`'s host and port
    /// are then replaced by the forward's local end when the cluster starts.
    #[serde(default)]
    pub forward: Option<String>,
}

/// A LangFlow instance on a node. Its `Debug` (and so a node's or cluster's) hides the key.
#[derive(Clone, Serialize, Deserialize)]
pub struct LangflowServiceConfig {
    pub url: Url,
    /// The `x-api-key` value, already read from the environment. Never logged or shown.
    #[serde(default, skip_serializing)]
    pub api_key: Option<String>,
    /// Flows this instance serves, by our name (e.g. `narration-text`, `narration-visual`,
    /// or any alias a `langflow` step may name).
    #[serde(default)]
    pub flows: BTreeMap<String, FlowConfig>,
    /// The SSH forward (by name) this service is reached through, as for ComfyUI.
    #[serde(default)]
    pub forward: Option<String>,
}

impl std::fmt::Debug for LangflowServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LangflowServiceConfig")
            .field("url", &self.url.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("flows", &self.flows)
            .field("forward", &self.forward)
            .finish()
    }
}

/// How to call one LangFlow flow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// LangFlow's flow id (UUID) or endpoint name, used in `/api/v1/run/{id}`.
    pub id: String,
    /// Component id of the flow's Chat Input, which receives uploaded files (images, videos)
    /// through a `files` tweak. Needed only by flows that take files, e.g. visual narration.
    #[serde(default)]
    pub file_component: Option<String>,
}

/// One SSH server on the way to a box: address, identity, and how its host key is checked.
/// Its `Debug` leaves the passphrase out.
#[derive(Clone, Serialize, Deserialize)]
pub struct SshHop {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The private key the daemon authenticates with (OpenSSH or PEM format).
    pub key_file: PathBuf,
    /// The key file's passphrase, already read from the environment. Never logged or shown.
    #[serde(default, skip_serializing)]
    pub key_passphrase: Option<String>,
    /// The known_hosts file the server's host key must be listed in.
    pub known_hosts: PathBuf,
    /// Accept a host key that known_hosts does not list (never a changed one), pinning it
    /// for the daemon's lifetime. Off unless the config says so; logged with the
    /// fingerprint whenever it happens.
    #[serde(default)]
    pub accept_unknown_host_keys: bool,
}

impl std::fmt::Debug for SshHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let passphrase = self.key_passphrase.as_ref().map(|_| "<redacted>");
        f.debug_struct("SshHop")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("key_file", &self.key_file)
            .field("key_passphrase", &passphrase)
            .field("known_hosts", &self.known_hosts)
            .field("accept_unknown_host_keys", &self.accept_unknown_host_keys)
            .finish()
    }
}

/// An SSH tunnel to a box: the session, the forwards opened through it and its timings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SshConfig {
    /// The box's SSH server.
    pub target: SshHop,
    /// A server the session to `target` is opened through (`ssh -J`).
    #[serde(default)]
    pub jump: Option<SshHop>,
    pub forwards: Vec<ForwardConfig>,
    #[serde(default)]
    pub timing: TunnelTiming,
}

/// A local listener whose connections are carried to a port on (or beside) the box.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardConfig {
    /// What services refer to it by, e.g. `comfyui`.
    pub name: String,
    /// Host the SSH server connects to, as seen from the box (usually `127.0.0.1`).
    pub remote_host: String,
    pub remote_port: u16,
    /// Local port on 127.0.0.1; 0 picks a free one when the cluster starts (kept across
    /// reconnects).
    #[serde(default)]
    pub local_port: u16,
}

/// Timeouts, liveness and backoff of a tunnel, in milliseconds. The defaults declare a
/// black-holed link dead within about a minute.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TunnelTiming {
    /// TCP connect, SSH handshake and authentication together.
    pub connect_timeout_ms: u64,
    /// A keepalive is sent after this long without hearing from the server...
    pub keepalive_interval_ms: u64,
    /// ...and the session is declared dead after this many go unanswered.
    pub keepalive_max: usize,
    /// How often a channel is opened through the session to prove it carries traffic.
    pub probe_interval_ms: u64,
    /// Longest wait for a direct-tcpip channel to open (probe or forwarded connection).
    pub channel_open_timeout_ms: u64,
    /// Longest wait for one write to either side of a forwarded connection.
    pub write_timeout_ms: u64,
    /// First wait before reconnecting; doubles (with jitter) up to the cap.
    pub backoff_initial_ms: u64,
    pub backoff_cap_ms: u64,
}

impl Default for TunnelTiming {
    fn default() -> TunnelTiming {
        TunnelTiming {
            connect_timeout_ms: 15_000,
            keepalive_interval_ms: 15_000,
            keepalive_max: 3,
            probe_interval_ms: 15_000,
            channel_open_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            backoff_initial_ms: 200,
            backoff_cap_ms: 30_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ssh_hop_shows_no_passphrase_in_debug_or_json() {
        let hop = SshHop {
            host: "192.0.2.15".into(),
            port: 22,
            user: "multiplex".into(),
            key_file: "/etc/multiplex/id_ed25519".into(),
            key_passphrase: Some("hunter2".into()),
            known_hosts: "/etc/multiplex/known_hosts".into(),
            accept_unknown_host_keys: false,
        };
        let debug = format!("{hop:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("<redacted>"),
            "{debug}"
        );
        let json = serde_json::to_string(&hop).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
    }

    #[test]
    fn a_langflow_service_shows_no_api_key_in_debug_or_json() {
        let service = LangflowServiceConfig {
            url: Url::parse("http://127.0.0.1:7860").unwrap(),
            api_key: Some("sk-lf-hunter2".into()),
            flows: BTreeMap::new(),
            forward: None,
        };
        let debug = format!("{service:?}");
        assert!(
            !debug.contains("sk-lf-hunter2") && debug.contains("<redacted>"),
            "{debug}"
        );
        let json = serde_json::to_string(&service).unwrap();
        assert!(!json.contains("sk-lf-hunter2"), "{json}");
    }
}
