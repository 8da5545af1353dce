//! The daemon's configuration file: reading it, and resolving it into what the actors run with.
//!
//! Two stages, so that errors name what the operator wrote: [`ConfigFile`] is the TOML as
//! written (a service has either a `url` or a `simulate` table; secrets are named by the
//! environment variable holding them), and [`resolve`] turns it into the actors'
//! [`ClusterConfig`], starting the simulators a file asks for on loopback ports.
//!
//! With no `--config`, the daemon uses `config/default.toml`, embedded in the binary together
//! with the templates and example workflows, which describes a four-box cluster served
//! entirely by simulators: a bare `multiplex serve` is a working cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use multiplex_actors::config::{
    ClusterConfig, ComfyServiceConfig, FlowConfig, ForwardConfig, GpuConfig, LangflowServiceConfig,
    NodeConfig, SshConfig, SshHop, TunnelTiming, DEFAULT_MAX_STEPS, DEFAULT_NODE_GRACE_MS,
};
use multiplex_actors::workflow::TemplateLibrary;
use multiplex_sim::comfyui::{ComfySim, ComfySimConfig};
use multiplex_sim::langflow::{LangflowSim, LangflowSimConfig};
use rust_embed::RustEmbed;
use serde::Deserialize;
use tracing::info;
use url::Url;

use crate::auth::TokenSpec;

/// The `config/` folder, built into the binary.
#[derive(RustEmbed)]
#[folder = "config/"]
#[include = "*.toml"]
#[include = "templates/*.json"]
#[include = "workflows/*.json"]
pub struct Embedded;

/// Name of the built-in config inside [`Embedded`].
pub const DEFAULT_CONFIG: &str = "default.toml";
/// Where the daemon listens when neither the file nor the command line says.
pub const DEFAULT_BIND: &str = "127.0.0.1:7700";
/// Data directory when neither the file nor the command line says.
pub const DEFAULT_DATA_DIR: &str = "multiplex-data";
/// What a `[nodes.comfyui]` section may list under `capabilities`: the step kinds ComfyUI
/// templates produce.
pub const COMFY_CAPABILITIES: &[&str] = &["image", "video"];

/// The configuration file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub daemon: DaemonSection,
    #[serde(default)]
    pub templates: TemplatesSection,
    #[serde(default)]
    pub nodes: Vec<NodeSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    pub bind: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: Option<usize>,
    /// How long a node may be away before its work is placed elsewhere (milliseconds).
    pub node_grace_ms: Option<u64>,
    /// Most steps a submitted workflow may have (see [`ClusterConfig::max_steps`]).
    pub max_steps: Option<usize>,
    /// Browser origins allowed to call the daemon besides loopback pages, e.g.
    /// `"https://canvas.example.com"` (see docs/api.md, "Browsers").
    #[serde(default, alias = "mcp_allowed_origins")]
    pub allowed_origins: Vec<String>,
    /// Host names the daemon answers under besides loopback names and IP addresses
    /// (DNS-rebinding defence; a daemon with tokens answers under any name but on /mcp).
    #[serde(default, alias = "mcp_allowed_hosts")]
    pub allowed_hosts: Vec<String>,
    /// Bearer tokens, each named by the environment variable holding it, with its role:
    /// `tokens = [{ env = "MULTIPLEX_OPERATOR_TOKEN", role = "operator" }]`. None: the
    /// daemon is open, and then only on loopback unless `allow_open` (see [`crate::auth`]).
    #[serde(default)]
    pub tokens: Vec<TokenSpec>,
    /// Serve without tokens on a non-loopback address (a trusted network, a proxy that
    /// authenticates). Off by default.
    #[serde(default)]
    pub allow_open: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatesSection {
    /// Template for `image` steps that name none.
    pub image: Option<String>,
    /// Template for `video` steps that name none.
    pub video: Option<String>,
    /// A folder of extra templates (relative to the config file), read after the built-in
    /// ones; a template with a built-in name replaces it.
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub name: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub gpus: Vec<GpuConfig>,
    #[serde(default)]
    pub slots: Option<u32>,
    #[serde(default)]
    pub comfyui: Option<ComfySection>,
    #[serde(default)]
    pub langflow: Option<LangflowSection>,
    /// Reach the box through an SSH tunnel (see docs/tunnels.md).
    #[serde(default)]
    pub ssh: Option<SshSection>,
}

/// `[nodes.ssh]`: the box's SSH server, the forwards opened through it, and optionally a
/// jump host and timings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSection {
    pub host: String,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    pub user: String,
    pub key_file: PathBuf,
    /// Environment variable holding the key file's passphrase, if it has one.
    pub passphrase_env: Option<String>,
    pub known_hosts: PathBuf,
    /// Accept (and pin, with a logged fingerprint) a host key known_hosts lacks.
    #[serde(default)]
    pub accept_unknown_host_keys: bool,
    /// A server the session is opened through, like `ssh -J`.
    pub jump: Option<SshHopSection>,
    pub forwards: Vec<ForwardSection>,
    #[serde(default)]
    pub timing: TunnelTiming,
}

impl SshSection {
    /// The box's own server, in the form a jump host is written in.
    fn hop(&self) -> SshHopSection {
        SshHopSection {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            key_file: self.key_file.clone(),
            passphrase_env: self.passphrase_env.clone(),
            known_hosts: self.known_hosts.clone(),
            accept_unknown_host_keys: self.accept_unknown_host_keys,
        }
    }
}

/// One SSH server: where, who, which key, which known_hosts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshHopSection {
    pub host: String,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    pub user: String,
    pub key_file: PathBuf,
    /// Environment variable holding the key file's passphrase, if it has one.
    pub passphrase_env: Option<String>,
    pub known_hosts: PathBuf,
    /// Accept (and pin, with a logged fingerprint) a host key known_hosts lacks.
    #[serde(default)]
    pub accept_unknown_host_keys: bool,
}

fn default_ssh_port() -> u16 {
    22
}

/// `[[nodes.ssh.forwards]]`: a local port carried to `remote` as the box sees it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSection {
    pub name: String,
    /// `host:port` as seen from the box, e.g. `127.0.0.1:8188`.
    pub remote: String,
    /// Local port on 127.0.0.1; 0 (the default) picks a free one.
    #[serde(default)]
    pub local_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComfySection {
    pub url: Option<Url>,
    /// Reach this ComfyUI through the `[nodes.ssh]` forward of this name.
    pub forward: Option<String>,
    /// Run a simulator for this node instead of reaching a real ComfyUI.
    pub simulate: Option<ComfySimConfig>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub models: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LangflowSection {
    pub url: Option<Url>,
    /// Reach this LangFlow through the `[nodes.ssh]` forward of this name.
    pub forward: Option<String>,
    /// Run a simulator for this node instead of reaching a real LangFlow.
    pub simulate: Option<LangflowSimConfig>,
    /// Environment variable holding the LangFlow API key.
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub flows: BTreeMap<String, FlowConfig>,
}

/// Where the configuration came from, for messages and relative paths.
#[derive(Debug, Clone)]
pub enum Source {
    Embedded,
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Embedded => write!(f, "the built-in config/{DEFAULT_CONFIG}"),
            Source::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Reads the file named on the command line, or the embedded default.
pub fn load(path: Option<&Path>) -> anyhow::Result<(ConfigFile, Source)> {
    let (text, source) = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            (text, Source::File(path.to_path_buf()))
        }
        None => (embedded_text(DEFAULT_CONFIG)?, Source::Embedded),
    };
    let file: ConfigFile =
        toml::from_str(&text).with_context(|| format!("invalid configuration in {source}"))?;
    Ok((file, source))
}

/// A text file from the embedded `config/` folder.
pub fn embedded_text(name: &str) -> anyhow::Result<String> {
    let file = Embedded::get(name).with_context(|| format!("config/{name} is not built in"))?;
    String::from_utf8(file.data.into_owned()).with_context(|| format!("config/{name} is not UTF-8"))
}

/// The built-in templates plus those of the file's template folder, if any.
pub fn templates(file: &ConfigFile, source: &Source) -> anyhow::Result<TemplateLibrary> {
    let mut sources = Vec::new();
    for name in Embedded::iter().filter(|name| name.starts_with("templates/")) {
        sources.push((name.to_string(), embedded_text(&name)?));
    }
    let mut library =
        TemplateLibrary::from_sources(sources.iter().map(|(n, t)| (n.as_str(), t.as_str())))
            .context("a built-in template is invalid")?;
    if let Some(dir) = &file.templates.dir {
        let dir = match source {
            Source::File(path) => path.parent().unwrap_or(Path::new(".")).join(dir),
            Source::Embedded => dir.clone(),
        };
        let extra = TemplateLibrary::load_dir(&dir)
            .with_context(|| format!("cannot load templates from {}", dir.display()))?;
        library.merge(extra);
    }
    let defaults = [
        ("image", &file.templates.image),
        ("video", &file.templates.video),
    ];
    for (field, name) in defaults {
        let Some(name) = name else { continue };
        if library.get(name).is_none() {
            let known: Vec<&str> = library.iter().map(|t| t.name.as_str()).collect();
            bail!(
                "invalid configuration in {source}: [templates] {field} names template \
                 {name:?}, which does not exist (known: {})",
                known.join(", ")
            );
        }
    }
    Ok(library)
}

/// Checks what serde cannot: values that parse but would make a node useless or a typo
/// that would only surface when the first workflow fails to place. Runs before any
/// simulator starts; every error names the node and the field.
pub fn validate(file: &ConfigFile) -> anyhow::Result<()> {
    if file.daemon.max_steps == Some(0) {
        bail!(
            "[daemon] `max_steps` is 0, so every workflow would be refused (omit it for the \
               default, {DEFAULT_MAX_STEPS})"
        );
    }
    let mut names = std::collections::HashSet::new();
    for (index, node) in file.nodes.iter().enumerate() {
        if node.name.trim().is_empty() {
            bail!("[[nodes]] entry {}: `name` is empty", index + 1);
        }
        let name = &node.name;
        if !names.insert(name.as_str()) {
            bail!("node name {name:?} appears twice in [[nodes]]");
        }
        if node.comfyui.is_none() && node.langflow.is_none() {
            bail!("node {name}: needs a [nodes.comfyui] or [nodes.langflow] section");
        }
        if node.slots == Some(0) {
            bail!("node {name}: `slots` is 0, so it could never run a step (omit it or use 1+)");
        }
        if let Some(comfy) = &node.comfyui {
            for capability in &comfy.capabilities {
                if !COMFY_CAPABILITIES.contains(&capability.as_str()) {
                    bail!(
                        "node {name}: [nodes.comfyui] capabilities lists {capability:?}, \
                         which is not a known capability (known: {})",
                        COMFY_CAPABILITIES.join(", ")
                    );
                }
            }
            check_scheme(name, "comfyui", comfy.url.as_ref())?;
        }
        if let Some(langflow) = &node.langflow {
            check_scheme(name, "langflow", langflow.url.as_ref())?;
        }
        check_forwards(node)?;
        if let Some(ssh) = &node.ssh {
            check_timing(name, &ssh.timing)?;
        }
    }
    Ok(())
}

/// Every SSH key file can be read now: a missing key is a typo to report at startup, not a
/// tunnel that fails later with a hint about the key's format or passphrase.
fn check_key_files(file: &ConfigFile) -> anyhow::Result<()> {
    for node in &file.nodes {
        let Some(ssh) = &node.ssh else { continue };
        let hops = [
            Some(("[nodes.ssh]", &ssh.key_file)),
            ssh.jump
                .as_ref()
                .map(|jump| ("[nodes.ssh.jump]", &jump.key_file)),
        ];
        for (section, key_file) in hops.into_iter().flatten() {
            std::fs::File::open(key_file).with_context(|| {
                format!(
                    "node {}: {section} key_file {} cannot be read",
                    node.name,
                    key_file.display()
                )
            })?;
        }
    }
    Ok(())
}

/// Every tunnel timing is a duration or count the tunnel waits on or multiplies: a 0 makes
/// a reconnect backoff that never grows past 0 (a hot reconnect loop), timeouts that expire
/// at once, or keepalives that declare every session dead, so the tunnel flaps.
fn check_timing(node: &str, timing: &TunnelTiming) -> anyhow::Result<()> {
    let defaults = timing_fields(&TunnelTiming::default());
    for ((field, value), (_, default)) in timing_fields(timing).into_iter().zip(defaults) {
        if value == 0 {
            bail!(
                "node {node}: [nodes.ssh.timing] `{field}` is 0; it must be at least 1 \
                 (omit it for the default, {default})"
            );
        }
    }
    if timing.backoff_cap_ms < timing.backoff_initial_ms {
        bail!(
            "node {node}: [nodes.ssh.timing] `backoff_cap_ms` ({}) is below \
             `backoff_initial_ms` ({}): the cap must be at least the first wait",
            timing.backoff_cap_ms,
            timing.backoff_initial_ms
        );
    }
    Ok(())
}

/// Each timing by its name in the file.
fn timing_fields(timing: &TunnelTiming) -> [(&'static str, u64); 8] {
    [
        ("connect_timeout_ms", timing.connect_timeout_ms),
        ("keepalive_interval_ms", timing.keepalive_interval_ms),
        ("keepalive_max", timing.keepalive_max as u64),
        ("probe_interval_ms", timing.probe_interval_ms),
        ("channel_open_timeout_ms", timing.channel_open_timeout_ms),
        ("write_timeout_ms", timing.write_timeout_ms),
        ("backoff_initial_ms", timing.backoff_initial_ms),
        ("backoff_cap_ms", timing.backoff_cap_ms),
    ]
}

/// Forward names are unique within a node, and a service's `forward` names one of them.
fn check_forwards(node: &NodeSection) -> anyhow::Result<()> {
    let name = &node.name;
    let forwards: Vec<&str> = node
        .ssh
        .iter()
        .flat_map(|ssh| ssh.forwards.iter().map(|f| f.name.as_str()))
        .collect();
    for (index, forward) in forwards.iter().enumerate() {
        if forwards[..index].contains(forward) {
            bail!("node {name}: [[nodes.ssh.forwards]] name {forward:?} appears twice");
        }
    }
    let wanted = [
        (
            "comfyui",
            node.comfyui.as_ref().and_then(|c| c.forward.as_ref()),
        ),
        (
            "langflow",
            node.langflow.as_ref().and_then(|l| l.forward.as_ref()),
        ),
    ];
    for (service, forward) in wanted {
        let Some(forward) = forward else { continue };
        if node.ssh.is_none() {
            bail!("node {name}: [nodes.{service}] forward = {forward:?} needs a [nodes.ssh]");
        }
        if !forwards.contains(&forward.as_str()) {
            bail!(
                "node {name}: [nodes.{service}] forward = {forward:?} names no forward of \
                 [nodes.ssh] (known: {})",
                forwards.join(", ")
            );
        }
    }
    Ok(())
}

/// A service is reached over HTTP (and its WebSocket derived from it): any other scheme
/// (`ws:`, `ftp:`, a `localhost:8188` parsed as scheme `localhost`) is a mistake.
fn check_scheme(node: &str, service: &str, url: Option<&Url>) -> anyhow::Result<()> {
    match url {
        Some(url) if !matches!(url.scheme(), "http" | "https") => bail!(
            "node {node}: [nodes.{service}] url {url} has scheme {:?}; use http or https",
            url.scheme()
        ),
        _ => Ok(()),
    }
}

/// Simulators started for the configuration; they stop when the daemon stops.
#[derive(Default)]
pub struct Simulators {
    pub comfyui: Vec<ComfySim>,
    pub langflow: Vec<LangflowSim>,
}

/// Turns the file into the actors' configuration, starting the simulators it asks for and
/// reading secrets from the environment. Every error names the node and the field.
pub async fn resolve(file: &ConfigFile) -> anyhow::Result<(ClusterConfig, Simulators)> {
    let mut sims = Simulators::default();
    let mut nodes = Vec::new();
    if file.nodes.is_empty() {
        bail!("the configuration has no [[nodes]]: nothing could run a workflow");
    }
    validate(file)?;
    check_key_files(file)?;
    for node in &file.nodes {
        let comfyui = match &node.comfyui {
            Some(section) => Some(resolve_comfy(node, section, &mut sims).await?),
            None => None,
        };
        let langflow = match &node.langflow {
            Some(section) => Some(resolve_langflow(node, section, &mut sims).await?),
            None => None,
        };
        let ssh = match &node.ssh {
            Some(section) => Some(resolve_ssh(&node.name, section)?),
            None => None,
        };
        nodes.push(NodeConfig {
            name: node.name.clone(),
            host: node.host.clone(),
            os: node.os.clone(),
            gpus: node.gpus.clone(),
            slots: node.slots,
            comfyui,
            langflow,
            ssh,
        });
    }
    let config = ClusterConfig {
        default_image_template: file
            .templates
            .image
            .clone()
            .unwrap_or("flux-txt2img".into()),
        default_video_template: file.templates.video.clone().unwrap_or("wan21-i2v".into()),
        nodes,
        node_grace_ms: file.daemon.node_grace_ms.unwrap_or(DEFAULT_NODE_GRACE_MS),
        max_steps: file.daemon.max_steps.unwrap_or(DEFAULT_MAX_STEPS),
    };
    Ok((config, sims))
}

async fn resolve_comfy(
    node: &NodeSection,
    section: &ComfySection,
    sims: &mut Simulators,
) -> anyhow::Result<ComfyServiceConfig> {
    let url = match (&section.url, &section.simulate, &section.forward) {
        (Some(url), None, None) => url.clone(),
        (None, None, Some(_)) => forwarded_url(),
        (None, Some(sim), None) => {
            let mut sim = sim.clone();
            if sim.models.is_empty() {
                sim.models = section.models.clone();
            }
            if let Some(gpu) = node.gpus.first() {
                sim.vram_mb = gpu.vram_mb;
                sim.gpu_name = gpu.model.clone();
            }
            let started = ComfySim::start(sim, loopback_any_port())
                .await
                .with_context(|| {
                    format!("node {}: cannot start the ComfyUI simulator", node.name)
                })?;
            let url = started.url();
            info!(node = %node.name, %url, "ComfyUI simulator started");
            sims.comfyui.push(started);
            url
        }
        _ => bail!(
            "node {}: [nodes.comfyui] needs exactly one of `url`, `simulate` and `forward`",
            node.name
        ),
    };
    Ok(ComfyServiceConfig {
        url,
        capabilities: section.capabilities.clone(),
        models: section.models.clone(),
        forward: section.forward.clone(),
    })
}

async fn resolve_langflow(
    node: &NodeSection,
    section: &LangflowSection,
    sims: &mut Simulators,
) -> anyhow::Result<LangflowServiceConfig> {
    let mut api_key = match &section.api_key_env {
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!(
                "node {}: [nodes.langflow] api_key_env names {var}, which is not set",
                node.name
            )
        })?),
        None => None,
    };
    let url = match (&section.url, &section.simulate, &section.forward) {
        (Some(url), None, None) => url.clone(),
        (None, None, Some(_)) => forwarded_url(),
        (None, Some(sim), None) => {
            let mut sim = sim.clone();
            if sim.api_key.is_none() {
                sim.api_key = api_key.clone();
            }
            api_key = sim.api_key.clone();
            let started = LangflowSim::start(sim, loopback_any_port())
                .await
                .with_context(|| {
                    format!("node {}: cannot start the LangFlow simulator", node.name)
                })?;
            let url = started.url();
            info!(node = %node.name, %url, "LangFlow simulator started");
            sims.langflow.push(started);
            url
        }
        _ => bail!(
            "node {}: [nodes.langflow] needs exactly one of `url`, `simulate` and `forward`",
            node.name
        ),
    };
    Ok(LangflowServiceConfig {
        url,
        api_key,
        flows: section.flows.clone(),
        forward: section.forward.clone(),
    })
}

/// A forwarded service's URL until the cluster binds the forward and puts its local port in.
fn forwarded_url() -> Url {
    Url::parse("http://127.0.0.1/").expect("a literal URL parses")
}

/// `[nodes.ssh]` into the actors' form, reading passphrases from the environment.
fn resolve_ssh(node: &str, section: &SshSection) -> anyhow::Result<SshConfig> {
    let mut forwards = Vec::new();
    for forward in &section.forwards {
        let (host, port) = forward
            .remote
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .with_context(|| {
                format!(
                    "node {node}: [[nodes.ssh.forwards]] {:?} has remote {:?}; \
                     write it as host:port, e.g. 127.0.0.1:8188",
                    forward.name, forward.remote
                )
            })?;
        forwards.push(ForwardConfig {
            name: forward.name.clone(),
            remote_host: host.trim_matches(['[', ']']).to_string(),
            remote_port: port,
            local_port: forward.local_port,
        });
    }
    Ok(SshConfig {
        target: resolve_hop(node, "[nodes.ssh]", &section.hop())?,
        jump: match &section.jump {
            Some(jump) => Some(resolve_hop(node, "[nodes.ssh] jump", jump)?),
            None => None,
        },
        forwards,
        timing: section.timing.clone(),
    })
}

fn resolve_hop(node: &str, place: &str, hop: &SshHopSection) -> anyhow::Result<SshHop> {
    let key_passphrase = match &hop.passphrase_env {
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!("node {node}: {place} passphrase_env names {var}, which is not set")
        })?),
        None => None,
    };
    Ok(SshHop {
        host: hop.host.clone(),
        port: hop.port,
        user: hop.user.clone(),
        key_file: hop.key_file.clone(),
        key_passphrase,
        known_hosts: hop.known_hosts.clone(),
        accept_unknown_host_keys: hop.accept_unknown_host_keys,
    })
}

fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn parse(text: &str) -> ConfigFile {
        toml::from_str(text).expect("the test config parses")
    }

    /// The message `validate` refuses `text` with.
    fn refusal(text: &str) -> String {
        let err = validate(&parse(text)).expect_err("the config should be refused");
        format!("{err:#}")
    }

    const GOOD_NODE: &str = r#"
        [[nodes]]
        name = "box1"
        slots = 2
        [nodes.comfyui]
        url = "http://127.0.0.1:8188"
        capabilities = ["image", "video"]
        [[nodes]]
        name = "box4"
        [nodes.langflow]
        url = "https://flows.example"
    "#;

    #[test]
    fn a_sound_config_passes() {
        validate(&parse(GOOD_NODE)).unwrap();
        let example = parse(&embedded_text("cluster.example.toml").unwrap());
        validate(&example).unwrap();
        assert_eq!(example.daemon.tokens.len(), 2, "the example shows tokens");
        let (file, source) = load(None).unwrap();
        validate(&file).unwrap();
        templates(&file, &source).unwrap();
    }

    #[test]
    fn useless_nodes_and_typos_are_refused_naming_node_and_field() {
        let text = refusal(
            r#"[[nodes]]
            name = " "
            [nodes.comfyui]
            url = "http://127.0.0.1:8188""#,
        );
        assert!(
            text.contains("entry 1") && text.contains("`name` is empty"),
            "{text}"
        );

        let text = refusal(
            r#"[[nodes]]
            name = "box1"
            slots = 0
            [nodes.comfyui]
            url = "http://127.0.0.1:8188""#,
        );
        assert!(
            text.contains("node box1") && text.contains("`slots` is 0"),
            "{text}"
        );

        let text = refusal(
            r#"[[nodes]]
            name = "box2"
            [nodes.comfyui]
            url = "http://127.0.0.1:8188"
            capabilities = ["image", "imgae"]"#,
        );
        assert!(
            text.contains("node box2") && text.contains("\"imgae\""),
            "{text}"
        );
        assert!(text.contains("known: image, video"), "{text}");

        for (service, url) in [("comfyui", "ws://127.0.0.1:8188"), ("langflow", "ftp://x")] {
            let text = refusal(&format!(
                "[[nodes]]\nname = \"box3\"\n[nodes.{service}]\nurl = \"{url}\""
            ));
            assert!(
                text.contains("node box3") && text.contains(&format!("[nodes.{service}] url")),
                "{text}"
            );
            assert!(text.contains("use http or https"), "{text}");
        }
    }

    #[test]
    fn default_templates_must_exist() {
        let file = parse(&format!("[templates]\nvideo = \"wan21-i2vv\"\n{GOOD_NODE}"));
        let err = templates(&file, &Source::Embedded).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("[templates] video") && text.contains("\"wan21-i2vv\""),
            "{text}"
        );
        assert!(
            text.contains("wan21-i2v"),
            "the known names are listed: {text}"
        );

        let file = parse(&format!(
            "[templates]\nimage = \"flux-txt2img\"\n{GOOD_NODE}"
        ));
        templates(&file, &Source::Embedded).unwrap();
    }

    #[test]
    fn tokens_name_their_variable_and_role() {
        let file = parse(&format!(
            r#"[daemon]
            bind = "0.0.0.0:7700"
            allow_open = false
            tokens = [{{ env = "MULTIPLEX_OPERATOR_TOKEN", role = "operator" }},
                      {{ env = "MULTIPLEX_VIEWER_TOKEN", role = "viewer" }}]
            {GOOD_NODE}"#
        ));
        let tokens: Vec<(&str, Role)> = file
            .daemon
            .tokens
            .iter()
            .map(|t| (t.env.as_str(), t.role))
            .collect();
        assert_eq!(
            tokens,
            [
                ("MULTIPLEX_OPERATOR_TOKEN", Role::Operator),
                ("MULTIPLEX_VIEWER_TOKEN", Role::Viewer)
            ]
        );
        assert!(!file.daemon.allow_open);
        let open = parse(GOOD_NODE);
        assert!(open.daemon.tokens.is_empty() && !open.daemon.allow_open);
    }

    #[test]
    fn a_token_in_the_file_or_an_unknown_role_is_refused() {
        for (entry, expected) in [
            (r#"{ env = "T", role = "admin" }"#, "admin"),
            (
                r#"{ env = "T", role = "viewer", token = "s3cret" }"#,
                "token",
            ),
            (r#"{ role = "viewer" }"#, "env"),
        ] {
            let text = format!("[daemon]\ntokens = [{entry}]\n{GOOD_NODE}");
            let err = toml::from_str::<ConfigFile>(&text).expect_err("refused");
            let message = err.to_string();
            assert!(message.contains(expected), "{entry}: {message}");
        }
    }

    const SSH_NODE: &str = r#"
        [[nodes]]
        name = "box5"
        [nodes.comfyui]
        forward = "comfyui"
        capabilities = ["image"]
        [nodes.ssh]
        host = "192.0.2.15"
        user = "multiplex"
        key_file = "/etc/multiplex/id_ed25519"
        known_hosts = "/etc/multiplex/known_hosts"
        jump = { host = "192.0.2.1", user = "jump", key_file = "/k", known_hosts = "/kh" }
        [nodes.ssh.timing]
        keepalive_interval_ms = 5000
        [[nodes.ssh.forwards]]
        name = "comfyui"
        remote = "127.0.0.1:8188"
        local_port = 18188
    "#;

    #[test]
    fn an_ssh_node_resolves_with_its_forwards_jump_and_timings() {
        let file = parse(SSH_NODE);
        validate(&file).unwrap();
        let ssh = resolve_ssh("box5", file.nodes[0].ssh.as_ref().unwrap()).unwrap();
        assert_eq!(ssh.target.port, 22, "the port defaults to 22");
        assert_eq!(ssh.jump.as_ref().map(|j| j.user.as_str()), Some("jump"));
        assert_eq!(ssh.timing.keepalive_interval_ms, 5000);
        assert_eq!(
            ssh.timing.keepalive_max, 3,
            "unset timings keep their defaults"
        );
        let forward = &ssh.forwards[0];
        assert_eq!(
            (
                forward.remote_host.as_str(),
                forward.remote_port,
                forward.local_port
            ),
            ("127.0.0.1", 8188, 18188)
        );
    }

    /// The examples operators copy: docs/tunnels.md's config block, and the commented
    /// tunnel node of cluster.example.toml once uncommented.
    #[test]
    fn the_documented_tunnel_examples_are_valid() {
        let doc = include_str!("../docs/tunnels.md");
        let block = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/tunnels.md has a TOML block");
        validate(&parse(block)).unwrap();

        let example = embedded_text("cluster.example.toml").unwrap();
        let start = example
            .find("# [[nodes]]\n# name = \"box5\"")
            .expect("the tunnel node");
        let end = start + example[start..].find("#\n# A box behind NAT").unwrap();
        let uncommented: Vec<&str> = example[start..end]
            .lines()
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .collect();
        let file = parse(&uncommented.join("\n"));
        validate(&file).unwrap();
        assert!(file.nodes[0]
            .ssh
            .as_ref()
            .is_some_and(|ssh| ssh.jump.is_some()));
    }

    #[test]
    fn forwards_that_do_not_add_up_are_refused_naming_node_and_forward() {
        let text = refusal(&SSH_NODE.replace("forward = \"comfyui\"", "forward = \"comfy\""));
        assert!(
            text.contains("node box5")
                && text.contains("\"comfy\"")
                && text.contains("known: comfyui"),
            "{text}"
        );

        let doubled = format!(
            "{SSH_NODE}\n        [[nodes.ssh.forwards]]\n        name = \"comfyui\"\n        \
             remote = \"127.0.0.1:8189\""
        );
        assert!(
            refusal(&doubled).contains("appears twice"),
            "{}",
            refusal(&doubled)
        );

        let text = refusal(
            r#"[[nodes]]
            name = "box6"
            [nodes.comfyui]
            forward = "comfyui""#,
        );
        assert!(text.contains("needs a [nodes.ssh]"), "{text}");

        let file = parse(&SSH_NODE.replace("127.0.0.1:8188", "127.0.0.1"));
        let err = resolve_ssh("box5", file.nodes[0].ssh.as_ref().unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains("host:port"), "{err:#}");

        // Typos in the section are refused, not ignored.
        let typo = SSH_NODE.replace("known_hosts = \"/etc", "known_host = \"/etc");
        assert!(toml::from_str::<ConfigFile>(&typo).is_err());
    }

    #[test]
    fn zero_tunnel_timings_are_refused_naming_node_and_field() {
        for field in [
            "connect_timeout_ms",
            "keepalive_interval_ms",
            "keepalive_max",
            "probe_interval_ms",
            "channel_open_timeout_ms",
            "write_timeout_ms",
            "backoff_initial_ms",
            "backoff_cap_ms",
        ] {
            // In place of the one timing the example sets: TOML refuses a key set twice.
            let text =
                refusal(&SSH_NODE.replace("keepalive_interval_ms = 5000", &format!("{field} = 0")));
            assert!(
                text.contains("node box5")
                    && text.contains("[nodes.ssh.timing]")
                    && text.contains(&format!("`{field}` is 0")),
                "{field}: {text}"
            );
        }
        let text = refusal(&SSH_NODE.replace(
            "keepalive_interval_ms = 5000",
            "backoff_initial_ms = 5000\n        backoff_cap_ms = 1000",
        ));
        assert!(
            text.contains("node box5") && text.contains("`backoff_cap_ms` (1000) is below"),
            "{text}"
        );
    }

    #[test]
    fn duplicate_names_and_serviceless_nodes_are_refused_by_validate() {
        let text = refusal(&format!(
            "{GOOD_NODE}\n[[nodes]]\nname = \"box1\"\n[nodes.langflow]"
        ));
        assert!(text.contains("\"box1\" appears twice"), "{text}");
        let text = refusal("[[nodes]]\nname = \"bare\"\nslots = 1");
        assert!(
            text.contains("node bare") && text.contains("needs a [nodes.comfyui] or"),
            "{text}"
        );
    }

    #[actix_rt::test]
    async fn a_missing_ssh_key_file_is_refused_at_startup_naming_it() {
        let file = parse(
            r#"[[nodes]]
            name = "box9"
            [nodes.comfyui]
            forward = "comfyui"
            [nodes.ssh]
            host = "127.0.0.1"
            user = "studio"
            key_file = "/nonexistent/multiplex/id_ed25519"
            known_hosts = "/nonexistent/known_hosts"
            forwards = [{ name = "comfyui", remote = "127.0.0.1:8188" }]"#,
        );
        let err = resolve(&file).await.err().expect("refused");
        let text = format!("{err:#}");
        assert!(
            text.contains("node box9: [nodes.ssh] key_file /nonexistent/multiplex/id_ed25519"),
            "{text}"
        );
    }

    #[test]
    fn a_max_steps_of_zero_is_refused_by_validate() {
        let text = refusal(&format!("[daemon]\nmax_steps = 0\n{GOOD_NODE}"));
        assert!(text.contains("`max_steps` is 0"), "{text}");
        validate(&parse(&format!("[daemon]\nmax_steps = 1\n{GOOD_NODE}"))).unwrap();
    }

    /// The first node's simulator would start before the second node's problem is seen if
    /// the check came late; validate sees it first, so resolve starts nothing.
    #[actix_rt::test]
    async fn a_duplicate_name_is_refused_before_any_simulator_starts() {
        let file = parse(
            r#"[[nodes]]
            name = "twin"
            [nodes.comfyui]
            simulate = {}
            [[nodes]]
            name = "twin"
            [nodes.comfyui]
            simulate = {}"#,
        );
        assert!(validate(&file).is_err());
        let err = resolve(&file).await.err().expect("refused");
        assert!(format!("{err:#}").contains("appears twice"), "{err:#}");
    }

    #[actix_rt::test]
    async fn resolve_refuses_before_starting_anything() {
        let file = parse(
            r#"[[nodes]]
            name = "box1"
            slots = 0
            [nodes.comfyui]
            simulate = {}"#,
        );
        let err = resolve(&file).await.err().expect("refused");
        assert!(format!("{err:#}").contains("node box1"), "{err:#}");
    }
}
