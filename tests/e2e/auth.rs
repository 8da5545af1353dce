//! Bearer tokens and roles on every interface: REST, artifacts, the WebSocket and /mcp,
//! plus the startup refusals (an unset token variable, an open daemon on a public address).

use multiplex::daemon::{DaemonOptions, DaemonThread};
use serde_json::{json, Value};

use crate::util::{cluster_config, ActivitySocket, TestDaemon};

const OPERATOR: &str = "op-3f9a1c7e5b2d";
const VIEWER: &str = "view-8e4b2a6c0d1f";
/// The simulated LangFlow's API key in the log test.
const LANGFLOW_KEY: &str = "sk-lf-5d2e9b7a1c4f";

/// The test cluster with one operator and one viewer token, read from a map.
async fn guarded_daemon() -> TestDaemon {
    let tokens = r#"
[daemon]
tokens = [{ env = "TEST_OPERATOR_TOKEN", role = "operator" },
          { env = "TEST_VIEWER_TOKEN", role = "viewer" }]
"#;
    let environment = [
        ("TEST_OPERATOR_TOKEN", OPERATOR),
        ("TEST_VIEWER_TOKEN", VIEWER),
    ];
    TestDaemon::start_with_tokens(&cluster_config(1, tokens), &environment, OPERATOR).await
}

/// One ComfyUI step that makes an image: quick, and leaves an artifact.
fn invert() -> Value {
    json!({"name": "auth invert", "nodes": [{"id": "invert", "type": "comfyui", "data": {
        "output": "image",
        "workflow": {
            "1": {"class_type": "EmptyImage",
                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage",
                  "inputs": {"images": ["2", 0], "filename_prefix": "auth"}}}}}],
        "edges": []})
}

/// Sends a request with an optional bearer token: status, headers and JSON body.
async fn send(
    test: &TestDaemon,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = test.http.request(method, test.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("the daemon answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

fn assert_unauthorized(what: &str, answer: &(u16, reqwest::header::HeaderMap, Value)) {
    let (status, headers, body) = answer;
    assert_eq!(*status, 401, "{what}: {body}");
    let challenge = headers
        .get("www-authenticate")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    assert_eq!(body["error"], "unauthorized", "{what}: {body}");
    assert!(body["message"].is_string(), "{what}: {body}");
}

#[actix_rt::test]
async fn rest_and_artifacts_need_a_token_of_the_right_role() {
    use reqwest::Method;
    let test = guarded_daemon().await;

    let none = send(&test, Method::GET, "/api/workflows", None, None).await;
    assert_unauthorized("no token", &none);
    let wrong = send(&test, Method::GET, "/api/nodes", Some("guess"), None).await;
    assert_unauthorized("wrong token", &wrong);
    let (status, _, body) = send(&test, Method::GET, "/api/nodes", Some(VIEWER), None).await;
    assert_eq!(status, 200, "a viewer reads: {body}");

    let (status, headers, body) = send(
        &test,
        Method::POST,
        "/api/workflows",
        Some(VIEWER),
        Some(&invert()),
    )
    .await;
    assert_eq!(status, 403, "a viewer may not submit: {body}");
    assert_eq!(body["error"], "forbidden");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("operator") && message.contains("viewer"),
        "{message}"
    );
    assert!(headers.contains_key("www-authenticate"));
    let (status, _, body) = send(&test, Method::POST, "/api/workflows", None, None).await;
    assert_eq!(status, 401, "no token is 401 before any role check: {body}");

    let id = test.submit(&invert()).await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let cancel = format!("/api/workflows/{id}/cancel");
    let (status, _, _) = send(&test, Method::POST, &cancel, Some(VIEWER), None).await;
    assert_eq!(status, 403, "a viewer may not cancel");

    // Health stays open for liveness probes but says nothing more without a token.
    let (status, _, body) = send(&test, Method::GET, "/api/health", None, None).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let (status, _, body) = send(&test, Method::GET, "/api/health", Some(VIEWER), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["nodes_total"], 4, "{body}");
    let wrong = send(&test, Method::GET, "/api/health", Some("guess"), None).await;
    assert_unauthorized("wrong token on health", &wrong);

    // Artifacts take the token in the query too, for <img src>; other routes do not.
    let url = run["steps"][0]["artifacts"][0]["url"]
        .as_str()
        .expect("the run made an image")
        .to_string();
    let bare = send(&test, Method::GET, &url, None, None).await;
    assert_unauthorized("artifact without a token", &bare);
    let image = test
        .http
        .get(test.url(&format!("{url}?access_token={VIEWER}")))
        .send()
        .await
        .unwrap();
    assert_eq!(image.status(), 200);
    assert_eq!(image.headers()["content-type"], "image/png");
    let bad = format!("{url}?access_token=guess");
    assert_unauthorized(
        "wrong query token",
        &send(&test, Method::GET, &bad, None, None).await,
    );
    let elsewhere = format!("/api/workflows/{id}?access_token={VIEWER}");
    let refused = send(&test, Method::GET, &elsewhere, None, None).await;
    assert_unauthorized("query token on a REST route", &refused);
    let message = refused.2["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        !message.contains(VIEWER),
        "the token is never echoed: {message}"
    );

    test.daemon.stop().await;
}

#[actix_rt::test]
async fn websocket_viewers_watch_and_only_operators_command() {
    let test = guarded_daemon().await;
    let base = format!("ws://{}/ws", test.daemon.addr);

    let refused = ActivitySocket::open(&base, None).await.err();
    assert!(
        refused.as_deref().is_some_and(|err| err.contains("401")),
        "the upgrade needs a token: {refused:?}"
    );
    let wrong = ActivitySocket::open(&format!("{base}?access_token=guess"), None).await;
    assert!(wrong.is_err(), "a wrong query token is refused");

    // A browser's socket: the viewer token in the query.
    let mut viewer = ActivitySocket::open(&format!("{base}?access_token={VIEWER}"), None)
        .await
        .expect("a viewer may open the socket");
    viewer.send(&json!({"type": "subscribe"})).await;
    viewer.until(|m| m["type"] == "subscribed").await;
    let submit = json!({"type": "submit", "workflow": invert(), "request_id": 7});
    viewer.send(&submit).await;
    let seen = viewer.until(|m| m["type"] == "error").await;
    let error = seen.last().unwrap();
    assert_eq!(error["error"], "forbidden", "{error}");
    assert_eq!(error["request_id"], 7);
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("operator")),
        "{error}"
    );
    let cancel = json!({"type": "cancel", "run_id": "x", "request_id": 8});
    viewer.send(&cancel).await;
    let seen = viewer.until(|m| m["type"] == "error").await;
    assert_eq!(seen.last().unwrap()["request_id"], 8);

    let mut operator = ActivitySocket::open(&base, Some(OPERATOR))
        .await
        .expect("the operator's header opens the socket");
    operator.send(&submit).await;
    let seen = operator
        .until(|m| m["type"] == "submitted" || m["type"] == "error")
        .await;
    assert_eq!(seen.last().unwrap()["type"], "submitted", "{seen:?}");
    // The viewer, subscribed to everything, watches the operator's run.
    viewer.until(|m| m["type"] == "run_submitted").await;

    test.daemon.stop().await;
}

const ACCEPT_BOTH: &str = "application/json, text/event-stream";

/// POSTs one JSON-RPC message to /mcp: status, the session id answered, the message.
async fn mcp(
    test: &TestDaemon,
    token: Option<&str>,
    session: Option<&str>,
    body: &Value,
) -> (u16, Option<String>, Value) {
    let mut request = test
        .http
        .post(test.url("/mcp"))
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(session) = session {
        request = request
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-11-25");
    }
    let response = request.send().await.expect("/mcp answers");
    let status = response.status().as_u16();
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let text = response.text().await.unwrap_or_default();
    let data = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
        .rfind(|data| data.contains("\"id\""))
        .unwrap_or(&text);
    (
        status,
        session,
        serde_json::from_str(data).unwrap_or(Value::Null),
    )
}

/// A session for `token`: initialize, then the initialized notification.
async fn mcp_session(test: &TestDaemon, token: &str) -> String {
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "auth-test", "version": "0"}}});
    let (status, session, answer) = mcp(test, Some(token), None, &initialize).await;
    assert_eq!(status, 200, "{answer}");
    let session = session.expect("initialize answers a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, _) = mcp(test, Some(token), Some(&session), &initialized).await;
    assert_eq!(status, 202);
    session
}

fn tool_call(id: u64, name: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": name, "arguments": arguments}})
}

#[actix_rt::test]
async fn mcp_needs_a_token_and_viewers_only_read() {
    let test = guarded_daemon().await;
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "auth-test", "version": "0"}}});
    let response = test
        .http
        .post(test.url("/mcp"))
        .header("accept", ACCEPT_BOTH)
        .json(&initialize)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "no token, no MCP");
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let (status, _, _) = mcp(&test, Some("guess"), None, &initialize).await;
    assert_eq!(status, 401, "a wrong token, no MCP");

    let session = mcp_session(&test, VIEWER).await;
    let submit = tool_call(2, "submit_workflow", json!({"workflow": invert()}));
    let (status, _, answer) = mcp(&test, Some(VIEWER), Some(&session), &submit).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    let text = answer["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(
        text.contains("submit_workflow") && text.contains("operator"),
        "{answer}"
    );
    for (name, arguments) in [
        ("cancel_workflow", json!({"id": "x"})),
        ("allocate_gpu_resources", json!({"count": 1})),
        ("release_lease", json!({"id": "x"})),
    ] {
        let (_, _, answer) = mcp(
            &test,
            Some(VIEWER),
            Some(&session),
            &tool_call(3, name, arguments),
        )
        .await;
        assert_eq!(
            answer["result"]["structuredContent"]["error"], "forbidden",
            "{answer}"
        );
    }
    let (_, _, answer) = mcp(
        &test,
        Some(VIEWER),
        Some(&session),
        &tool_call(4, "list_nodes", json!({})),
    )
    .await;
    assert_ne!(
        answer["result"]["isError"], true,
        "a viewer lists nodes: {answer}"
    );
    let read = json!({"jsonrpc": "2.0", "id": 5, "method": "resources/read",
                      "params": {"uri": "multiplex://cluster/status"}});
    let (_, _, answer) = mcp(&test, Some(VIEWER), Some(&session), &read).await;
    assert!(
        answer["result"]["contents"].is_array(),
        "a viewer reads resources: {answer}"
    );
    // The session does not carry the role: each request's own token counts.
    let (status, _, _) = mcp(&test, None, Some(&session), &read).await;
    assert_eq!(status, 401);

    let session = mcp_session(&test, OPERATOR).await;
    let (_, _, answer) = mcp(&test, Some(OPERATOR), Some(&session), &submit).await;
    assert_ne!(answer["result"]["isError"], true, "{answer}");
    assert!(
        answer["result"]["structuredContent"]["id"].is_string(),
        "{answer}"
    );

    test.daemon.stop().await;
}

/// Starts a daemon expected to refuse, and answers its error.
fn refusal(config: &str, bind: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("multiplex.toml");
    std::fs::write(&path, config).unwrap();
    let options = DaemonOptions {
        config: Some(path),
        bind: Some(bind.into()),
        data_dir: Some(dir.path().join("data")),
        environment: Some(Default::default()),
        ..DaemonOptions::default()
    };
    match DaemonThread::spawn(options) {
        Ok(_) => panic!("the daemon started with {config}"),
        Err(err) => format!("{err:#}"),
    }
}

#[actix_rt::test]
async fn startup_refuses_a_missing_token_and_an_open_public_address() {
    let unset = r#"
[daemon]
tokens = [{ env = "MULTIPLEX_TEST_UNSET_TOKEN", role = "viewer" }]
"#;
    let text = refusal(&cluster_config(1, unset), "127.0.0.1:0");
    assert!(text.contains("MULTIPLEX_TEST_UNSET_TOKEN"), "{text}");

    let text = refusal(&cluster_config(1, ""), "0.0.0.0:0");
    assert!(
        text.contains("0.0.0.0:0") && text.contains("allow_open") && text.contains("tokens"),
        "{text}"
    );
}

/// Runs the `multiplex` binary with `stdin`, `token` in MULTIPLEX_TOKEN (none when `None`)
/// and nothing else of ours from the environment.
fn cli(args: &[&str], token: Option<&str>, stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_multiplex"));
    command
        .args(args)
        .env_remove("MULTIPLEX_TOKEN")
        .env_remove("MULTIPLEX_URL")
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(token) = token {
        command.env("MULTIPLEX_TOKEN", token);
    }
    let mut child = command.spawn().expect("the CLI starts");
    let mut input = child.stdin.take().expect("stdin is piped");
    input
        .write_all(stdin.as_bytes())
        .expect("stdin takes the input");
    drop(input);
    child.wait_with_output().expect("the CLI ends")
}

/// The CLI's error output as one string, asserting it is a single line.
fn one_line_error(output: &std::process::Output) -> String {
    assert!(!output.status.success(), "the command should fail");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[actix_rt::test]
async fn the_cli_sends_its_token_and_says_plainly_when_refused() {
    let test = guarded_daemon().await;
    let url = test.url("");
    let workflow = test.dir.path().join("invert.json");
    std::fs::write(&workflow, invert().to_string()).unwrap();
    let workflow = workflow.to_str().unwrap();

    let nodes = cli(&["nodes", "--url", &url], Some(VIEWER), "");
    assert!(nodes.status.success(), "{nodes:?}");
    assert!(String::from_utf8_lossy(&nodes.stdout).contains("img-a"));

    let text = one_line_error(&cli(&["status", "--url", &url], None, ""));
    assert!(
        text.contains("401") && text.contains("MULTIPLEX_TOKEN"),
        "{text}"
    );
    let text = one_line_error(&cli(&["nodes", "--url", &url], Some("guess"), ""));
    assert!(
        text.contains("401") && text.contains("not one this daemon"),
        "{text}"
    );
    assert!(
        !text.contains("guess"),
        "the token is never printed: {text}"
    );
    let text = one_line_error(&cli(&["submit", workflow, "--url", &url], Some(VIEWER), ""));
    assert!(text.contains("403") && text.contains("operator"), "{text}");
    let text = one_line_error(&cli(&["cancel", "x", "--url", &url], Some(VIEWER), ""));
    assert!(text.contains("403"), "{text}");
    let args = [
        "nodes",
        "--url",
        &url,
        "--token-env",
        "TEST_UNSET_CLI_TOKEN",
    ];
    let text = one_line_error(&cli(&args, Some(OPERATOR), ""));
    assert!(text.contains("TEST_UNSET_CLI_TOKEN"), "{text}");

    let args = ["submit", workflow, "--wait", "--url", &url];
    let submitted = cli(&args, Some(OPERATOR), "");
    assert!(submitted.status.success(), "{submitted:?}");

    test.daemon.stop().await;
}

#[actix_rt::test]
async fn the_stdio_relay_forwards_the_token() {
    let test = guarded_daemon().await;
    let url = test.url("");
    let input = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "auth-test", "version": "0"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        tool_call(2, "list_nodes", json!({})),
        tool_call(3, "submit_workflow", json!({"workflow": invert()})),
    ]
    .iter()
    .map(|message| format!("{message}\n"))
    .collect::<String>();
    let answers = |token: Option<&str>| -> Vec<Value> {
        let output = cli(&["mcp", "--url", &url], token, &input);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    };
    let by_id = |answers: &[Value], id: u64| -> Value {
        answers
            .iter()
            .find(|answer| answer["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no answer {id} in {answers:?}"))
    };

    let viewer = answers(Some(VIEWER));
    assert!(
        by_id(&viewer, 1)["result"]["serverInfo"].is_object(),
        "{viewer:?}"
    );
    assert_ne!(by_id(&viewer, 2)["result"]["isError"], true, "{viewer:?}");
    let refused = by_id(&viewer, 3);
    assert_eq!(
        refused["result"]["structuredContent"]["error"], "forbidden",
        "{refused}"
    );

    let anonymous = answers(None);
    let error = by_id(&anonymous, 1)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("401") && error.contains("MULTIPLEX_TOKEN"),
        "{error}"
    );

    test.daemon.stop().await;
}

/// A daemon process logging at debug level, so every request has its span and MCP its
/// lines: whatever a client sends, the tokens never show in what it writes, and neither does
/// the LangFlow API key it sends on every health probe and run.
#[actix_rt::test]
async fn tokens_never_reach_the_logs() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("multiplex.toml");
    let tokens = r#"
[daemon]
tokens = [{ env = "TEST_OPERATOR_TOKEN", role = "operator" },
          { env = "TEST_VIEWER_TOKEN", role = "viewer" }]
"#;
    // The simulated LangFlow then refuses any request without this key.
    let with_key = cluster_config(1, tokens).replace(
        "[nodes.langflow]\n",
        "[nodes.langflow]\napi_key_env = \"TEST_LANGFLOW_KEY\"\n",
    );
    std::fs::write(&config, with_key).unwrap();
    let log_path = dir.path().join("daemon.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_multiplex"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("TEST_OPERATOR_TOKEN", OPERATOR)
        .env("TEST_VIEWER_TOKEN", VIEWER)
        .env("TEST_LANGFLOW_KEY", LANGFLOW_KEY)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("the daemon process starts");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let base = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.strip_prefix(multiplex::harness::READY_PREFIX)
                .map(|url| url.trim_end_matches('/').to_string())
        })
        .expect("the daemon announces its address");
    let http = reqwest::Client::new();

    let succeed = |workflow: Value| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let submitted: Value = http
                .post(format!("{base}/api/workflows"))
                .bearer_auth(OPERATOR)
                .json(&workflow)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let run_url = format!("{base}/api/workflows/{}", submitted["id"].as_str().unwrap());
            let deadline = std::time::Instant::now() + crate::util::PATIENCE;
            loop {
                let run: Value = http
                    .get(&run_url)
                    .bearer_auth(VIEWER)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if run["state"] == "succeeded" {
                    break (run_url, run);
                }
                assert!(
                    std::time::Instant::now() < deadline && run["state"] != "failed",
                    "the run did not succeed: {run}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    // Succeeds only if the key went to LangFlow with the run.
    let talk = json!({"name": "keyed talk", "nodes": [{"id": "talk", "type": "langflow",
        "data": {"flow": "echo", "input": "hello"}}], "edges": []});
    succeed(talk).await;
    let (run_url, run) = succeed(invert()).await;
    let artifact = run["steps"][0]["artifacts"][0]["url"].as_str().unwrap();
    // The parameter percent-encoded is still the token parameter, and still kept from the
    // logs; where no token parameter is taken, it is refused either way.
    let token_urls = [
        (format!("{base}{artifact}?access_token={VIEWER}"), 200),
        (format!("{base}{artifact}?access%5Ftoken={VIEWER}"), 200),
        (format!("{run_url}?access%5ftoken={OPERATOR}"), 401),
        (format!("{run_url}?access_token={OPERATOR}"), 401),
    ];
    for (url, expected) in token_urls {
        let status = http.get(&url).send().await.unwrap().status();
        assert_eq!(status.as_u16(), expected, "{url}");
    }
    let ws = format!(
        "ws://{}/ws?since=0&access_token={VIEWER}",
        &base["http://".len()..]
    );
    let mut socket = ActivitySocket::open(&ws, None)
        .await
        .expect("the socket opens");
    socket.send(&json!({"type": "subscribe"})).await;
    socket.until(|m| m["type"] == "subscribed").await;
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "auth-test", "version": "0"}}});
    let mcp = http
        .post(format!("{base}/mcp"))
        .bearer_auth(VIEWER)
        .header("accept", ACCEPT_BOTH)
        .json(&initialize)
        .send()
        .await
        .unwrap();
    assert_eq!(mcp.status(), 200);
    drop(socket);

    drop(child);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("refused: no valid token"),
        "the refusal was logged (so the check below saw request spans): {log}"
    );
    for secret in [OPERATOR, VIEWER, LANGFLOW_KEY] {
        assert!(!log.contains(secret), "a secret is in the log:\n{log}");
    }
}

/// Our own child process, killed by its handle however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
