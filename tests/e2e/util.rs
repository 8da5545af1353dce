//! Test support: a daemon on port 0 with simulated nodes and a temporary data directory,
//! driven only through its HTTP and WebSocket interfaces.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use multiplex::daemon::{DaemonOptions, DaemonThread};
use serde_json::{json, Value};

/// Longest any test waits for a condition; a generous bound, never a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The simulator's visual narration flow: file uploads need a flow's id, not its name.
const VISUAL_FLOW_ID: &str = "6f1c3a52-2a8e-4d5b-9a41-0c1e5d7b8a02";

/// A small cluster: two image nodes, one video node, one LangFlow node, all simulated.
/// `image_step_ms` slows the image nodes' sampler steps for tests that need a step to be
/// running for a while.
pub fn cluster_config(image_step_ms: u64, extra: &str) -> String {
    format!(
        r#"
[templates]
image = "flux-txt2img"
video = "wan21-i2v"

[[nodes]]
name = "img-a"
gpus = [{{ model = "RTX A6000", vram_mb = 49140 }}]
[nodes.comfyui]
capabilities = ["image"]
simulate = {{ step_ms = {image_step_ms}, model_load_ms = 1 }}

[[nodes]]
name = "img-b"
gpus = [{{ model = "RTX A6000", vram_mb = 49140 }}]
[nodes.comfyui]
capabilities = ["image"]
simulate = {{ step_ms = {image_step_ms}, model_load_ms = 1 }}

[[nodes]]
name = "vid"
gpus = [{{ model = "RTX A6000", vram_mb = 49140 }}]
[nodes.comfyui]
capabilities = ["video"]
simulate = {{ step_ms = 1, model_load_ms = 1 }}

[[nodes]]
name = "llm"
gpus = [{{ model = "RTX 6000 Ada", vram_mb = 49140 }}]
slots = 4
[nodes.langflow]
simulate = {{}}
flows."narration-text" = {{ id = "narration-text" }}
flows."narration-visual" = {{ id = "{VISUAL_FLOW_ID}", file_component = "ChatInput-aaaa1" }}
flows."prompt-expansion" = {{ id = "prompt-expansion" }}
flows."echo" = {{ id = "echo" }}
flows."fail" = {{ id = "fail" }}
{extra}
"#
    )
}

/// A daemon under test.
pub struct TestDaemon {
    pub daemon: DaemonThread,
    /// Holds the config file and the data directory.
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub http: reqwest::Client,
    /// Sent as a bearer token by the helpers below, when the daemon has tokens.
    pub token: Option<String>,
    /// What the daemon reads `[daemon] tokens` variables from (the process environment when
    /// `None`); kept for restarts.
    environment: Option<HashMap<String, String>>,
}

impl TestDaemon {
    pub async fn start(config: &str) -> TestDaemon {
        let dir = tempfile::tempdir().expect("a temporary directory can be created");
        let config_path = dir.path().join("multiplex.toml");
        std::fs::write(&config_path, config).expect("the config file can be written");
        Self::start_in(dir, config_path, None, None).await
    }

    /// A daemon whose `[daemon] tokens` variables are read from `environment`; the helpers
    /// send `token`.
    pub async fn start_with_tokens(
        config: &str,
        environment: &[(&str, &str)],
        token: &str,
    ) -> TestDaemon {
        let dir = tempfile::tempdir().expect("a temporary directory can be created");
        let config_path = dir.path().join("multiplex.toml");
        std::fs::write(&config_path, config).expect("the config file can be written");
        let environment = environment
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Self::start_in(dir, config_path, Some(environment), Some(token.into())).await
    }

    /// Starts a daemon on `config` without waiting for its nodes (some may be meant to fail).
    #[allow(dead_code)] // used by tests/tunnel, which shares this file
    pub fn start_unready(config: &str) -> TestDaemon {
        let dir = tempfile::tempdir().expect("a temporary directory can be created");
        let config_path = dir.path().join("multiplex.toml");
        std::fs::write(&config_path, config).expect("the config file can be written");
        Self::spawn_in(dir, config_path, None, None)
    }

    async fn start_in(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        environment: Option<HashMap<String, String>>,
        token: Option<String>,
    ) -> TestDaemon {
        let test = Self::spawn_in(dir, config_path, environment, token);
        test.wait_nodes_available().await;
        test
    }

    fn spawn_in(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        environment: Option<HashMap<String, String>>,
        token: Option<String>,
    ) -> TestDaemon {
        let options = DaemonOptions {
            config: Some(config_path.clone()),
            bind: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.path().join("data")),
            environment: environment.clone(),
            ..DaemonOptions::default()
        };
        let daemon = DaemonThread::spawn(options).expect("the daemon starts");
        TestDaemon {
            daemon,
            dir,
            config_path,
            http: reqwest::Client::new(),
            token,
            environment,
        }
    }

    /// Stops the daemon and starts a new one on the same config and data directory.
    pub async fn restart(self) -> TestDaemon {
        let TestDaemon {
            daemon,
            dir,
            config_path,
            token,
            environment,
            ..
        } = self;
        daemon.stop().await;
        Self::start_in(dir, config_path, environment, token).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.daemon.addr)
    }

    /// Adds the bearer token, if the daemon has tokens.
    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .authorized(self.http.get(self.url(path)))
            .send()
            .await
            .expect("GET is answered");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A GET answered as it came, for tests of headers and bodies that are not JSON.
    pub async fn get_response(&self, path: &str) -> reqwest::Response {
        self.authorized(self.http.get(self.url(path)))
            .send()
            .await
            .expect("GET is answered")
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .authorized(self.http.post(self.url(path)))
            .json(body)
            .send()
            .await
            .expect("POST is answered");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .authorized(self.http.post(self.url(path)))
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .expect("POST is answered");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Submits a workflow and returns the run id, asserting the 201.
    pub async fn submit(&self, workflow: &Value) -> String {
        let (status, body) = self.post("/api/workflows", workflow).await;
        assert_eq!(status, 201, "submission refused: {body}");
        body["id"]
            .as_str()
            .expect("the answer has an id")
            .to_string()
    }

    pub async fn wait_nodes_available(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (_, body) = self.get("/api/nodes").await;
            let nodes = body["nodes"].as_array().cloned().unwrap_or_default();
            if !nodes.is_empty() && nodes.iter().all(|node| node["available"] == true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes never became available: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the run until `done` holds for it, and returns it.
    pub async fn wait_run(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, run) = self.get(&format!("/api/workflows/{id}")).await;
            assert_eq!(status, 200, "run {id} not found: {run}");
            if done(&run) {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} never reached the condition: {run}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the run to end and returns it.
    pub async fn wait_end(&self, id: &str) -> Value {
        self.wait_run(id, |run| {
            matches!(
                run["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
        .await
    }

    /// Opens the activity WebSocket, subscribed to one run (or all when `None`).
    pub async fn activity(&self, run_id: Option<&str>) -> ActivitySocket {
        let url = format!("ws://{}/ws", self.daemon.addr);
        // Previews make activity frames larger than awc's 64 KiB default.
        let mut request = awc::Client::new().ws(url).max_frame_size(16 * 1024 * 1024);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let (_response, mut socket) = request.connect().await.expect("the WebSocket opens");
        let subscribe = json!({ "type": "subscribe", "run_id": run_id, "since": 0 });
        socket
            .send(awc::ws::Message::Text(subscribe.to_string().into()))
            .await
            .expect("subscribe is sent");
        ActivitySocket { socket }
    }
}

/// The daemon's activity stream as a test reads it.
pub struct ActivitySocket {
    socket: actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>,
}

impl ActivitySocket {
    /// Opens `url` as given, unsubscribed, with an optional bearer token; the upgrade's
    /// refusal comes back as text, for tests of the upgrade itself.
    pub async fn open(url: &str, bearer: Option<&str>) -> Result<ActivitySocket, String> {
        let mut request = awc::Client::new().ws(url).max_frame_size(16 * 1024 * 1024);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        match request.connect().await {
            Ok((_response, socket)) => Ok(ActivitySocket { socket }),
            Err(err) => Err(format!("{err:?}")),
        }
    }

    /// Sends one frame as it is (a fragment, a ping, ...).
    #[allow(dead_code)] // used by tests/e2e, not by tests/tunnel, which shares this file
    pub async fn send_frame(&mut self, message: awc::ws::Message) {
        self.socket.send(message).await.expect("the frame is sent");
    }

    /// Sends a command frame.
    pub async fn send(&mut self, value: &Value) {
        self.socket
            .send(awc::ws::Message::Text(value.to_string().into()))
            .await
            .expect("the frame is sent");
    }

    /// The next JSON message, or `None` when the socket closed.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("an activity message arrives in time")?;
            match frame.expect("a valid frame") {
                awc::ws::Frame::Text(bytes) => {
                    return Some(serde_json::from_slice(&bytes).expect("messages are JSON"))
                }
                awc::ws::Frame::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Reads messages until one satisfies `wanted`, returning everything read up to it.
    pub async fn until(&mut self, wanted: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        while let Some(message) = self.next().await {
            let found = wanted(&message);
            seen.push(message);
            if found {
                return seen;
            }
        }
        panic!("the socket closed before the expected message; saw {seen:?}");
    }
}

/// Reads a built-in example workflow.
pub fn example(name: &str) -> Value {
    let path = format!("{}/config/workflows/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("the example workflow exists");
    serde_json::from_str(&text).expect("the example workflow is JSON")
}

/// The step of a run view with this id.
pub fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|step| step["id"] == id))
        .unwrap_or_else(|| panic!("run has no step {id}: {run}"))
}
