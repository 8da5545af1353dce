//! MCP tests: the Streamable HTTP rules at the HTTP level (sessions, Accept, Origin,
//! version negotiation), then the official MCP Python SDK driving a daemon with simulated
//! nodes over HTTP and over `multiplex mcp` (stdio), in both protocol eras.
//!
//! The Python half needs the virtualenv that .ci/run creates (`.venv` at the repository
//! root with the `mcp` package, or the interpreter named by MULTIPLEX_PYTHON). Without it
//! these tests fail and say how to create it: a skipped MCP test would hide a broken server.

#[allow(dead_code)]
#[path = "../e2e/util.rs"]
mod util;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use util::{cluster_config, TestDaemon};

const ACCEPT_BOTH: &str = "application/json, text/event-stream";

fn initialize(version: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {},
        "clientInfo": {"name": "multiplex-test", "version": "0"}}})
}

async fn post(
    daemon: &TestDaemon,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = daemon
        .http
        .post(daemon.url("/mcp"))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("/mcp answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap_or_default())
}

/// The one JSON-RPC message of a JSON or single-event SSE body.
fn message(body: &str) -> Value {
    let data = body
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
        .find(|data| !data.is_empty())
        .unwrap_or(body);
    serde_json::from_str(data).unwrap_or_else(|_| panic!("not JSON-RPC: {body}"))
}

#[actix_rt::test]
async fn sessions_versions_accept_and_origin() {
    let daemon = TestDaemon::start(&cluster_config(1, "")).await;

    // A newer client version is negotiated down inside initialize, never refused.
    let (status, headers, body) = post(
        &daemon,
        &initialize("2099-01-01"),
        &[("accept", ACCEPT_BOTH)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let session = headers
        .get("mcp-session-id")
        .and_then(|value| value.to_str().ok())
        .expect("initialize answers a session id")
        .to_string();
    let answer = message(&body);
    assert_eq!(
        answer["result"]["protocolVersion"], "2025-11-25",
        "{answer}"
    );
    assert_eq!(answer["result"]["serverInfo"]["name"], "multiplex");

    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let with_session = [
        ("accept", ACCEPT_BOTH),
        ("mcp-session-id", session.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, _) = post(&daemon, &initialized, &with_session).await;
    assert_eq!(status, 202, "a notification is accepted with 202");
    let (status, _, body) = post(&daemon, &list, &with_session).await;
    assert_eq!(status, 200, "{body}");
    assert!(message(&body)["result"]["tools"]
        .as_array()
        .is_some_and(|t| t.len() == 7));

    // Missing session: 400. Unknown (or expired) session: 404, so the client starts over.
    let (status, _, _) = post(&daemon, &list, &[("accept", ACCEPT_BOTH)]).await;
    assert_eq!(status, 400);
    let unknown = [
        ("accept", ACCEPT_BOTH),
        ("mcp-session-id", "no-such-session"),
    ];
    let (status, _, _) = post(&daemon, &list, &unknown).await;
    assert_eq!(status, 404);

    // Accept of JSON only or SSE only is served in that form.
    for (accept, kind) in [
        ("application/json", "application/json"),
        ("text/event-stream", "text/event-stream"),
    ] {
        let (status, headers, body) =
            post(&daemon, &initialize("2025-11-25"), &[("accept", accept)]).await;
        assert_eq!(status, 200, "Accept {accept}: {body}");
        let content_type = headers["content-type"].to_str().unwrap_or_default();
        assert!(
            content_type.starts_with(kind),
            "Accept {accept} got {content_type}"
        );
        assert_eq!(message(&body)["id"], 1);
    }

    // Loopback origins pass; others are refused.
    let local = [("accept", ACCEPT_BOTH), ("origin", "http://localhost:5173")];
    let (status, _, _) = post(&daemon, &initialize("2025-11-25"), &local).await;
    assert_eq!(status, 200);
    let foreign = [("accept", ACCEPT_BOTH), ("origin", "https://evil.example")];
    let (status, _, _) = post(&daemon, &initialize("2025-11-25"), &foreign).await;
    assert_eq!(status, 403);

    // The 2026-07-28 probe is answered, so modern clients need no handshake.
    let discover = json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientInfo": {"name": "probe", "version": "0"},
                  "io.modelcontextprotocol/clientCapabilities": {}}}});
    let modern = [
        ("accept", ACCEPT_BOTH),
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "server/discover"),
    ];
    let (status, _, body) = post(&daemon, &discover, &modern).await;
    assert_eq!(status, 200, "{body}");
    let supported = &message(&body)["result"]["supportedVersions"];
    assert!(
        supported
            .as_array()
            .is_some_and(|v| v.contains(&json!("2026-07-28"))),
        "{body}"
    );

    daemon.daemon.stop().await;
}

/// The interpreter with the `mcp` package, or a failure that says how to get one.
fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("MULTIPLEX_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    let help = "run .ci/run, or create the venv: \
        python3 -m venv .venv && .venv/bin/pip install mcp==2.3.0 \
        (or point MULTIPLEX_PYTHON at an interpreter that has the mcp package)";
    let probe = Command::new(&python)
        .args(["-c", "import mcp"])
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}; {help}", python.display()));
    assert!(
        probe.status.success(),
        "{} cannot import the mcp package: {}; {help}",
        python.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    python
}

fn client_check(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/client_check.py");
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("the MCP client check runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("MCP client check passed"),
        "MCP client check {args:?} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}

/// Both transports, both eras, one daemon: the checks are independent of each other.
#[actix_rt::test]
async fn python_sdk_client_over_http_and_stdio() {
    let daemon = TestDaemon::start(&cluster_config(1, "")).await;
    let endpoint = daemon.url("/mcp");
    let base = daemon.url("");
    let binary = env!("CARGO_BIN_EXE_multiplex");
    let runs: Vec<Vec<String>> = vec![
        vec![
            "http".into(),
            endpoint.clone(),
            "--mode".into(),
            "legacy".into(),
        ],
        vec!["http".into(), endpoint, "--mode".into(), "auto".into()],
        vec![
            "stdio".into(),
            binary.into(),
            base.clone(),
            "--mode".into(),
            "legacy".into(),
        ],
        vec![
            "stdio".into(),
            binary.into(),
            base,
            "--mode".into(),
            "auto".into(),
        ],
    ];
    for args in runs {
        // The client is a blocking child process; keep the daemon's runtime free.
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            client_check(&args);
        })
        .await
        .expect("the client check finished");
    }
    daemon.daemon.stop().await;
}

/// Posts `body` as it is, JSON-typed: status, content type and text.
async fn post_text(
    daemon: &TestDaemon,
    body: &str,
    session: Option<&str>,
) -> (u16, String, String) {
    let mut request = daemon
        .http
        .post(daemon.url("/mcp"))
        .header("content-type", "application/json")
        .header("accept", ACCEPT_BOTH)
        .body(body.to_string());
    if let Some(session) = session {
        request = request
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-11-25");
    }
    let response = request.send().await.expect("/mcp answers");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (
        status,
        content_type,
        response.text().await.unwrap_or_default(),
    )
}

/// rmcp answered a body that is not JSON, or not a JSON-RPC message, with a plain-text 415;
/// JSON-RPC wants an error response: -32700 for a parse error, -32600 for a bad message.
#[actix_rt::test]
async fn bodies_that_are_not_messages_get_jsonrpc_errors() {
    let daemon = TestDaemon::start(&cluster_config(1, "")).await;
    let cases = [
        ("{garbage", -32700, Value::Null),
        ("", -32700, Value::Null),
        ("[1,2,3]", -32600, Value::Null),
        (r#"{"jsonrpc":"2.0","id":8,"method":5}"#, -32600, json!(8)),
        (
            r#"{"jsonrpc":"1.0","id":"x","method":"ping"}"#,
            -32600,
            json!("x"),
        ),
    ];
    for (body, code, id) in cases {
        let (status, content_type, text) = post_text(&daemon, body, None).await;
        assert_eq!(status, 400, "{body:?}: {text}");
        assert!(
            content_type.starts_with("application/json"),
            "{body:?}: {content_type}"
        );
        let answer: Value = serde_json::from_str(&text).expect("the answer is JSON");
        assert_eq!(answer["jsonrpc"], "2.0", "{answer}");
        assert_eq!(answer["id"], id, "{body:?}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body:?}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    // A real message still goes through.
    let (status, _, text) = post_text(&daemon, &initialize("2025-11-25").to_string(), None).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(message(&text)["id"], 1, "{text}");
    daemon.daemon.stop().await;
}

/// submit_workflow goes through the same validation as REST: a document nested too deep
/// to be stored is refused, naming where, instead of becoming a run nobody can read.
#[actix_rt::test]
async fn submit_workflow_refuses_documents_nested_too_deep() {
    let daemon = TestDaemon::start(&cluster_config(1, "")).await;
    let (status, headers, body) = post(
        &daemon,
        &initialize("2025-11-25"),
        &[("accept", ACCEPT_BOTH)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let session = headers["mcp-session-id"]
        .to_str()
        .expect("a session id")
        .to_string();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, _) = post_text(&daemon, &initialized.to_string(), Some(&session)).await;
    assert_eq!(status, 202);

    let position = (0..100).fold(json!(0), |inner, _| json!([inner]));
    let workflow = json!({"name": "deep", "nodes": [
        {"id": "a", "type": "intent", "data": {"prompt": "x"}, "position": position}]});
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "submit_workflow", "arguments": {"workflow": workflow}}});
    let (status, _, text) = post_text(&daemon, &call.to_string(), Some(&session)).await;
    assert_eq!(status, 200, "{text}");
    let result = &message(&text)["result"];
    assert_eq!(result["isError"], true, "{result}");
    let shown = result.to_string();
    assert!(shown.contains("too_deep"), "{shown}");
    assert!(shown.contains("nodes[0].position"), "{shown}");

    let (status, list) = daemon.get("/api/workflows").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["runs"], json!([]), "{list}");
    daemon.daemon.stop().await;
}

/// Artifact links point where the client reached the daemon, not at the bound address
/// (`0.0.0.0` on a daemon serving the network is no address a client can use).
#[actix_rt::test]
async fn artifact_links_use_the_address_the_client_reached() {
    let daemon = TestDaemon::start(&cluster_config(1, "")).await;
    let id = daemon.submit(&util::example("invert.json")).await;
    let run = daemon.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");

    let host = format!("localhost:{}", daemon.daemon.addr.port());
    let headers = [("accept", ACCEPT_BOTH), ("host", host.as_str())];
    let (status, answer, body) = post(&daemon, &initialize("2025-11-25"), &headers).await;
    assert_eq!(status, 200, "{body}");
    let session = answer["mcp-session-id"].to_str().expect("a session id");
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "get_workflow_status", "arguments": {"id": id}}});
    let headers = [
        ("accept", ACCEPT_BOTH),
        ("host", host.as_str()),
        ("mcp-session-id", session),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let (status, _, text) = post(&daemon, &call, &headers).await;
    assert_eq!(status, 200, "{text}");
    let steps = &message(&text)["result"]["structuredContent"]["steps"];
    let href = steps[0]["artifacts"][0]["href"]
        .as_str()
        .unwrap_or_default();
    let expected = format!("http://{host}/api/artifacts/");
    assert!(href.starts_with(&expected), "{href} in {text}");
    daemon.daemon.stop().await;
}
