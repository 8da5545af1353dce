//! SSH tunnel tests: a real OpenSSH server on loopback (see [`sshd`]), the simulators behind
//! it, and a daemon that reaches them only through its tunnels, driven over HTTP.

mod sshd;
#[allow(dead_code)]
#[path = "../e2e/util.rs"]
mod util;

mod faults;
mod forwards;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use multiplex_sim::comfyui::{ComfySim, ComfySimConfig};
use multiplex_sim::langflow::{LangflowSim, LangflowSimConfig};
use serde_json::Value;

use sshd::Sshd;
use util::{TestDaemon, PATIENCE};

/// The simulator's visual narration flow (as in the e2e cluster).
const VISUAL_FLOW_ID: &str = "6f1c3a52-2a8e-4d5b-9a41-0c1e5d7b8a02";

/// Tunnel timings for tests: quick reconnects, and liveness that notices a dead server soon.
const FAST_TIMING: &str = "[nodes.ssh.timing]\nbackoff_initial_ms = 50\nbackoff_cap_ms = 500\n\
    keepalive_interval_ms = 2000\nprobe_interval_ms = 1000\nchannel_open_timeout_ms = 5000\n";

pub async fn comfy_sim(step_ms: u64) -> ComfySim {
    let config = ComfySimConfig {
        step_ms,
        model_load_ms: 1,
        ..ComfySimConfig::default()
    };
    ComfySim::start(config, loopback())
        .await
        .expect("the ComfyUI simulator starts")
}

pub async fn langflow_sim() -> LangflowSim {
    LangflowSim::start(LangflowSimConfig::default(), loopback())
        .await
        .expect("the LangFlow simulator starts")
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// `[nodes.ssh]` for a node reached through `sshd` with `key`, with the given forwards
/// (`name`, remote address) and extra lines for the section.
pub fn ssh_section(
    sshd: &Sshd,
    key: &Path,
    known_hosts: &Path,
    forwards: &[(&str, SocketAddr)],
    extra: &str,
) -> String {
    let mut text = format!(
        "[nodes.ssh]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nkey_file = \"{}\"\n\
         known_hosts = \"{}\"\n{extra}\n{FAST_TIMING}",
        sshd.port,
        sshd.user,
        key.display(),
        known_hosts.display(),
    );
    for (name, remote) in forwards {
        text.push_str(&format!(
            "[[nodes.ssh.forwards]]\nname = \"{name}\"\nremote = \"{remote}\"\n"
        ));
    }
    text
}

/// A ComfyUI node (image and video) reached only through `sshd`.
pub fn comfy_node(
    name: &str,
    sshd: &Sshd,
    comfy: SocketAddr,
    more: &[(&str, SocketAddr)],
) -> String {
    let mut forwards = vec![("comfyui", comfy)];
    forwards.extend_from_slice(more);
    format!(
        "[[nodes]]\nname = \"{name}\"\ngpus = [{{ model = \"RTX A6000\", vram_mb = 49140 }}]\n\
         [nodes.comfyui]\nforward = \"comfyui\"\ncapabilities = [\"image\", \"video\"]\n{}",
        ssh_section(sshd, &sshd.client_key, &sshd.known_hosts, &forwards, "")
    )
}

/// A LangFlow node reached only through `sshd`.
pub fn langflow_node(name: &str, sshd: &Sshd, langflow: SocketAddr) -> String {
    format!(
        "[[nodes]]\nname = \"{name}\"\nslots = 4\n[nodes.langflow]\nforward = \"langflow\"\n\
         flows.\"narration-text\" = {{ id = \"narration-text\" }}\n\
         flows.\"narration-visual\" = {{ id = \"{VISUAL_FLOW_ID}\", \
         file_component = \"ChatInput-aaaa1\" }}\n\
         flows.\"prompt-expansion\" = {{ id = \"prompt-expansion\" }}\n{}",
        ssh_section(
            sshd,
            &sshd.client_key,
            &sshd.known_hosts,
            &[("langflow", langflow)],
            ""
        )
    )
}

/// Starts a daemon on `config` without waiting for its nodes (tunnels may be meant to fail).
pub fn daemon(config: &str) -> TestDaemon {
    TestDaemon::start_unready(config)
}

/// The tunnel of `node` as GET /api/tunnels shows it.
pub async fn tunnel(daemon: &TestDaemon, node: &str) -> Value {
    let (status, body) = daemon.get("/api/tunnels").await;
    assert_eq!(status, 200, "{body}");
    body["tunnels"]
        .as_array()
        .and_then(|all| all.iter().find(|t| t["node"] == node))
        .cloned()
        .unwrap_or_else(|| panic!("no tunnel for {node}: {body}"))
}

/// Polls the tunnel of `node` until `wanted` holds, and returns it.
pub async fn wait_tunnel(
    daemon: &TestDaemon,
    node: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let view = tunnel(daemon, node).await;
        if wanted(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "tunnel never got there: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The local address of a tunnel's forward.
pub fn local_end(view: &Value, forward: &str) -> SocketAddr {
    view["forwards"]
        .as_array()
        .and_then(|all| all.iter().find(|f| f["name"] == forward))
        .and_then(|f| f["local"].as_str())
        .and_then(|local| local.parse().ok())
        .unwrap_or_else(|| panic!("no forward {forward}: {view}"))
}

#[actix_rt::test]
async fn a_workflow_runs_entirely_through_tunnels() {
    let sshd = Sshd::start();
    let comfy = comfy_sim(1).await;
    let langflow = langflow_sim().await;
    let config = format!(
        "[templates]\nimage = \"flux-txt2img\"\nvideo = \"wan21-i2v\"\n{}\n{}",
        comfy_node("gpu", &sshd, comfy.addr(), &[]),
        langflow_node("llm", &sshd, langflow.addr())
    );
    let daemon = daemon(&config);
    daemon.wait_nodes_available().await;

    // The config names no service address, only forwards: the simulators' ports reach
    // the daemon only as the forwards' remote ends, and it talks to the local ones.
    let view = tunnel(&daemon, "gpu").await;
    assert_ne!(local_end(&view, "comfyui"), comfy.addr(), "{view}");
    assert_eq!(
        view["forwards"][0]["remote"],
        comfy.addr().to_string(),
        "{view}"
    );

    let id = daemon.submit(&util::example("lighthouse.json")).await;
    let run = daemon.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");

    // Each tunnel's connecting and coming up are in the activity stream (its history).
    let mut activity = daemon.activity(None).await;
    let tunnel_event = |m: &Value, node: &str, state: &str| {
        m["type"] == "tunnel_state" && m["node"] == node && m["state"] == state
    };
    let ups = std::cell::Cell::new(0);
    let seen = activity
        .until(|m| {
            if tunnel_event(m, "gpu", "up") || tunnel_event(m, "llm", "up") {
                ups.set(ups.get() + 1);
            }
            ups.get() == 2
        })
        .await;
    for node in ["gpu", "llm"] {
        assert!(
            seen.iter().any(|m| tunnel_event(m, node, "connecting")),
            "{seen:?}"
        );
        assert!(seen.iter().any(|m| tunnel_event(m, node, "up")), "{seen:?}");
    }

    for node in ["gpu", "llm"] {
        let view = tunnel(&daemon, node).await;
        assert_eq!(view["state"], "up", "{view}");
        assert_eq!(view["attempts"], 1, "{view}");
        assert!(view["bytes_received"].as_u64() > Some(0), "{view}");
        assert!(view["channels_opened"].as_u64() > Some(0), "{view}");
    }
    daemon.daemon.stop().await;
}

#[actix_rt::test]
async fn a_session_through_a_jump_host_carries_the_forwards() {
    // The server is its own jump host: the session to it runs inside a direct-tcpip
    // channel of a first session to it, as `ssh -J` would do.
    let sshd = Sshd::start();
    let comfy = comfy_sim(1).await;
    let jump = format!(
        "jump = {{ host = \"127.0.0.1\", port = {}, user = \"{}\", key_file = \"{}\", \
         known_hosts = \"{}\" }}",
        sshd.port,
        sshd.user,
        sshd.client_key.display(),
        sshd.known_hosts.display()
    );
    let config = format!(
        "[[nodes]]\nname = \"gpu\"\n[nodes.comfyui]\nforward = \"comfyui\"\n\
         capabilities = [\"image\"]\n{}",
        ssh_section(
            &sshd,
            &sshd.client_key,
            &sshd.known_hosts,
            &[("comfyui", comfy.addr())],
            &jump
        )
    );
    let daemon = daemon(&config);
    daemon.wait_nodes_available().await;
    let view = tunnel(&daemon, "gpu").await;
    assert_eq!(
        view["jump"],
        format!("{}@127.0.0.1:{}", sshd.user, sshd.port),
        "{view}"
    );

    let id = daemon.submit(&util::example("invert.json")).await;
    let run = daemon.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    daemon.daemon.stop().await;
}
