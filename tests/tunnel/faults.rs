//! Tunnels under faults: the SSH server dying mid-run, host keys that do not match, a key
//! the server refuses.

use serde_json::{json, Value};

use super::sshd::Sshd;
use super::util::{self, step};
use super::*;

/// An image step slow enough to be running when the server is killed.
fn slow_image() -> Value {
    json!({
        "name": "slow still",
        "nodes": [
            {"id": "brief", "type": "intent", "data": {"prompt": "a lighthouse at dusk"}},
            {"id": "still", "type": "image", "data": {"steps": 40, "seed": 3}},
            {"id": "deliver", "type": "output", "data": {}}
        ],
        "edges": [
            {"id": "e1", "source": "brief", "target": "still"},
            {"id": "e2", "source": "still", "target": "deliver"}
        ]
    })
}

#[actix_rt::test]
async fn the_tunnel_reconnects_after_sshd_is_killed_and_the_run_completes() {
    let mut sshd = Sshd::start();
    let comfy = comfy_sim(50).await;
    let config = format!(
        "[templates]\nimage = \"flux-txt2img\"\n{}",
        comfy_node("gpu", &sshd, comfy.addr(), &[])
    );
    let daemon = daemon(&config);
    daemon.wait_nodes_available().await;

    let id = daemon.submit(&slow_image()).await;
    daemon
        .wait_run(&id, |run| step(run, "still")["state"] == "running")
        .await;

    sshd.kill();
    let down = wait_tunnel(&daemon, "gpu", |t| t["state"] != "up").await;
    assert!(down["last_error"].is_string(), "{down}");
    sshd.restart();

    let run = daemon.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let view = wait_tunnel(&daemon, "gpu", |t| t["state"] == "up").await;
    assert!(view["reconnects"].as_u64() >= Some(1), "{view}");
    daemon.daemon.stop().await;
}

#[actix_rt::test]
async fn a_prompt_finished_while_its_only_node_was_away_past_the_grace_is_collected() {
    let mut sshd = Sshd::start();
    let comfy = comfy_sim(50).await;
    // A grace much shorter than the still (40 steps of 50 ms): the step is given up on the
    // node and its pin let go of while ComfyUI, only cut off, goes on with the prompt.
    let config = format!(
        "[daemon]\nnode_grace_ms = 200\n\n[templates]\nimage = \"flux-txt2img\"\n{}",
        comfy_node("gpu", &sshd, comfy.addr(), &[])
    );
    let daemon = daemon(&config);
    daemon.wait_nodes_available().await;

    let id = daemon.submit(&slow_image()).await;
    let run = daemon
        .wait_run(&id, |run| {
            step(run, "still")["state"] == "running" && step(run, "still")["remote"].is_object()
        })
        .await;
    let prompt = step(&run, "still")["remote"]["prompt_id"]
        .as_str()
        .expect("a prompt id")
        .to_string();

    sshd.kill();
    // The node gave the step up, and the run queued it again under the same prompt id.
    daemon
        .wait_run(&id, |run| {
            step(run, "still")["attempts"].as_u64() >= Some(2)
        })
        .await;
    let history = format!("{}history/{prompt}", comfy.url());
    let deadline = Instant::now() + util::PATIENCE;
    loop {
        let answer: Value = reqwest::get(&history)
            .await
            .expect("the simulator answers")
            .json()
            .await
            .expect("history is JSON");
        if answer.get(&prompt).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the prompt never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sshd.restart();

    // Back, the node is asked where the prompt stands: finished, so its outputs are
    // collected and nothing is posted again.
    let run = daemon.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(step(&run, "still")["node"], "gpu", "{run}");
    assert_eq!(comfy.prompts_received(), 1, "{:?}", comfy.prompts_by_id());
    daemon.daemon.stop().await;
}

/// A step taken off a node that went away and finished on another: the first node, back,
/// still runs the old prompt, which nothing follows any more. It is cancelled there.
#[actix_rt::test]
async fn a_prompt_left_on_a_node_whose_step_ran_elsewhere_is_cancelled_when_it_returns() {
    let mut sshd = Sshd::start();
    // 40 steps of 250 ms: still running on the far box long after the step moved.
    let far = comfy_sim(250).await;
    let near = comfy_sim(1).await;
    let config = format!(
        "[daemon]\nnode_grace_ms = 200\n\n[templates]\nimage = \"flux-txt2img\"\n{}\n\
         [[nodes]]\nname = \"near\"\n[nodes.comfyui]\nurl = \"{}\"\n\
         capabilities = [\"image\"]\n",
        comfy_node("far", &sshd, far.addr(), &[]),
        near.url()
    );
    let daemon = daemon(&config);
    daemon.wait_nodes_available().await;

    let id = daemon.submit(&slow_image()).await;
    let run = daemon
        .wait_run(&id, |run| {
            step(run, "still")["state"] == "running" && step(run, "still")["node"] == "far"
        })
        .await;
    let prompt = step(&run, "still")["remote"]["prompt_id"]
        .as_str()
        .expect("a prompt id")
        .to_string();

    sshd.kill();
    let run = daemon.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(step(&run, "still")["node"], "near", "{run}");
    assert!(
        far.interrupted_prompts().is_empty(),
        "nothing reached the far box yet"
    );

    sshd.restart();
    let deadline = Instant::now() + util::PATIENCE;
    while far.interrupted_prompts() != [prompt.clone()] {
        assert!(
            Instant::now() < deadline,
            "the far box kept running {prompt}: {:?}",
            far.interrupted_prompts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.daemon.stop().await;
}

#[actix_rt::test]
async fn host_keys_not_in_known_hosts_are_refused_naming_the_fingerprint() {
    let mut changed = Sshd::start();
    changed.change_host_key();
    let unknown = Sshd::start();
    let empty = unknown.dir.path().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let comfy = comfy_sim(1).await;
    let forwards = [("comfyui", comfy.addr())];
    let node = |name: &str, sshd: &Sshd, known_hosts: &std::path::Path, extra: &str| {
        format!(
            "[[nodes]]\nname = \"{name}\"\n[nodes.comfyui]\nforward = \"comfyui\"\n{}",
            ssh_section(sshd, &sshd.client_key, known_hosts, &forwards, extra)
        )
    };
    let config = [
        node("changed", &changed, &changed.known_hosts, ""),
        node("unknown", &unknown, &empty, ""),
        node(
            "opted-in",
            &unknown,
            &empty,
            "accept_unknown_host_keys = true",
        ),
    ]
    .join("\n");
    let daemon = daemon(&config);

    let view = wait_tunnel(&daemon, "changed", |t| t["state"] == "failed").await;
    let error = view["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("has changed"), "{view}");
    assert!(error.contains(&changed.fingerprint()), "{view}");
    assert!(
        error.contains(&format!("127.0.0.1:{}", changed.port)),
        "{view}"
    );

    let view = wait_tunnel(&daemon, "unknown", |t| t["state"] == "failed").await;
    let error = view["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("is not in"), "{view}");
    assert!(error.contains(&unknown.fingerprint()), "{view}");

    // The same unknown key is accepted where the config opts in, and the node serves.
    wait_tunnel(&daemon, "opted-in", |t| t["state"] == "up").await;
    let id = daemon.submit(&util::example("invert.json")).await;
    let run = daemon.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(step(&run, "invert")["node"], "opted-in", "{run}");

    // Refusals are final: one attempt each, however long the daemon has been running.
    for node in ["changed", "unknown"] {
        let view = tunnel(&daemon, node).await;
        assert_eq!(view["state"], "failed", "{view}");
        assert_eq!(view["attempts"], 1, "{view}");
    }

    // Once known_hosts lists the new key, a reconnect (an actor restart) brings it up.
    changed.write_known_hosts();
    let (status, view) = daemon
        .post("/api/tunnels/changed/reconnect", &Value::Null)
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["restarts"], 1, "{view}");
    let view = wait_tunnel(&daemon, "changed", |t| t["state"] == "up").await;
    assert_eq!(view["attempts"], 2, "{view}");
    let (status, body) = daemon
        .post("/api/tunnels/nobody/reconnect", &Value::Null)
        .await;
    assert_eq!(status, 404, "{body}");
    daemon.daemon.stop().await;
}

#[actix_rt::test]
async fn a_refused_client_key_fails_once_without_retrying() {
    let refusing = Sshd::start();
    let good = Sshd::start();
    let comfy = comfy_sim(1).await;
    let forwards = [("comfyui", comfy.addr())];
    // Backoff of a millisecond: a retry loop would show as many attempts at once.
    let timing_overrides = "";
    let config = format!(
        "[[nodes]]\nname = \"refused\"\n[nodes.comfyui]\nforward = \"comfyui\"\n{}\n{}",
        ssh_section(
            &refusing,
            &refusing.stranger_key(),
            &refusing.known_hosts,
            &forwards,
            timing_overrides
        )
        .replace("backoff_initial_ms = 50", "backoff_initial_ms = 1")
        .replace("backoff_cap_ms = 500", "backoff_cap_ms = 1"),
        comfy_node("good", &good, comfy.addr(), &[]),
    );
    let daemon = daemon(&config);

    let view = wait_tunnel(&daemon, "refused", |t| t["state"] == "failed").await;
    let error = view["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("refused the key"), "{view}");
    assert!(error.contains("stranger_ed25519"), "{view}");

    // Let real work happen meanwhile on the other node, then look again.
    wait_tunnel(&daemon, "good", |t| t["state"] == "up").await;
    let id = daemon.submit(&util::example("invert.json")).await;
    let run = daemon.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let view = tunnel(&daemon, "refused").await;
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(view["attempts"], 1, "{view}");
    // The server saw the readiness check and one tunnel attempt, nothing more.
    let log = refusing.log();
    assert_eq!(log.matches("Connection from").count(), 2, "{log}");
    daemon.daemon.stop().await;
}

#[actix_rt::test]
async fn a_black_holed_session_is_declared_dead_and_replaced() {
    let sshd = Sshd::start();
    let comfy = comfy_sim(1).await;
    let daemon = daemon(&comfy_node("gpu", &sshd, comfy.addr(), &[]));
    wait_tunnel(&daemon, "gpu", |t| t["state"] == "up").await;
    daemon.wait_nodes_available().await;

    // The session's server process stops answering, but nothing closes: only keepalives
    // and the probe can tell.
    sshd.signal_sessions("-STOP");
    let down = wait_tunnel(&daemon, "gpu", |t| t["state"] != "up").await;
    assert!(down["last_error"].is_string(), "{down}");
    let (_, nodes) = daemon.get("/api/nodes").await;
    assert_eq!(nodes["nodes"][0]["available"], false, "{nodes}");
    assert!(
        nodes["nodes"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("tunnel"),
        "{nodes}"
    );
    // Leave the frozen session be (it is killed with the server): a new one comes up.
    let view = wait_tunnel(&daemon, "gpu", |t| t["state"] == "up").await;
    assert!(view["reconnects"].as_u64() >= Some(1), "{view}");
    daemon.wait_nodes_available().await;
    daemon.daemon.stop().await;
}

#[actix_rt::test]
async fn a_key_with_a_passphrase_from_the_environment_opens_and_the_secret_stays_hidden() {
    const VAR: &str = "MULTIPLEX_TEST_TUNNEL_PASSPHRASE";
    const SECRET: &str = "correct horse battery staple";
    let sshd = Sshd::start();
    let key = sshd.passphrase_key(SECRET);
    std::env::set_var(VAR, SECRET);
    let comfy = comfy_sim(1).await;
    let config = format!(
        "[[nodes]]\nname = \"gpu\"\n[nodes.comfyui]\nforward = \"comfyui\"\n\
         capabilities = [\"image\"]\n{}",
        ssh_section(
            &sshd,
            &key,
            &sshd.known_hosts,
            &[("comfyui", comfy.addr())],
            &format!("passphrase_env = \"{VAR}\"")
        )
    );
    let daemon = daemon(&config);
    daemon.wait_nodes_available().await;
    for path in ["/api/tunnels", "/api/nodes"] {
        let (_, body) = daemon.get(path).await;
        assert!(
            !body.to_string().contains(SECRET),
            "{path} shows the passphrase: {body}"
        );
    }
    daemon.daemon.stop().await;
}
