//! What Multiplex costs per step, and how many durable runs it finishes per second.
//!
//! `cargo bench --bench steps`. Everything talks over loopback sockets to ComfyUI simulators
//! that do no work (`step_ms = 0`, `model_load_ms = 0`), so the figures are the protocol and
//! the daemon, not a GPU. Two parts, each side by side with its baseline:
//!
//! 1. Overhead: one EmptyImage -> ImageInvert -> SaveImage prompt, sequentially, done by a
//!    minimal direct ComfyUI client (socket open once, then POST /prompt, wait for the end
//!    on the socket, GET /history/{id}, stream /view to a file) and by Multiplex (POST
//!    /api/workflows, wait for the run's final state on /ws). Multiplex also records every
//!    transition in sled and stores the artifact content-addressed.
//! 2. Throughput: a batch of one-step runs submitted at once, against four simulators, and
//!    a batch of daemon-only runs (an `intent` feeding an `output`) that measure the store
//!    and the actors alone.
//!
//! docs/benchmarks.md keeps the figures.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use multiplex::daemon::{DaemonOptions, DaemonThread};
use multiplex_sim::comfyui::{ComfySim, ComfySimConfig};
use serde_json::{json, Value};

/// Sequential steps measured per way, after `WARMUP` unmeasured ones.
const STEPS: usize = 200;
const WARMUP: usize = 20;
/// Runs in each throughput batch.
const BATCH: usize = 1000;
/// Submissions in flight at once while a batch is sent.
const SUBMITTERS: usize = 32;
/// Longest anything may take before the bench gives up with a message.
const PATIENCE: Duration = Duration::from_secs(120);

type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

/// The ComfyUI graph both ways run: small, no models, one PNG out.
fn invert_prompt() -> Value {
    json!({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "b"}}
    })
}

fn zero_work() -> ComfySimConfig {
    ComfySimConfig {
        step_ms: 0,
        model_load_ms: 0,
        ..ComfySimConfig::default()
    }
}

async fn open_socket(url: String) -> Socket {
    let (_response, socket) = awc::Client::new()
        .ws(url)
        .max_frame_size(16 * 1024 * 1024)
        .connect()
        .await
        .expect("the WebSocket opens");
    socket
}

/// The next JSON text frame; binary and control frames are skipped.
async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .expect("a frame arrives in time")
            .expect("the socket stays open")
            .expect("the frame is valid");
        if let awc::ws::Frame::Text(bytes) = frame {
            return serde_json::from_slice(&bytes).expect("text frames are JSON");
        }
    }
}

/// A minimal direct ComfyUI client: what a script that talks to one box would do.
struct DirectClient {
    http: reqwest::Client,
    base: String,
    socket: Socket,
    files: tempfile::TempDir,
}

impl DirectClient {
    async fn connect(sim: &ComfySim) -> DirectClient {
        let base = sim.url().as_str().trim_end_matches('/').to_string();
        let ws = format!(
            "{}/ws?clientId=bench-direct",
            base.replacen("http", "ws", 1)
        );
        let mut socket = open_socket(ws).await;
        while next_json(&mut socket).await["type"] != "status" {}
        DirectClient {
            http: reqwest::Client::new(),
            base,
            socket,
            files: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    async fn run_one(&mut self) {
        let prompt_id = uuid::Uuid::new_v4().to_string();
        let body = json!({"prompt": invert_prompt(), "client_id": "bench-direct",
                          "prompt_id": prompt_id});
        let answer = self
            .http
            .post(format!("{}/prompt", self.base))
            .json(&body)
            .send()
            .await
            .expect("POST /prompt");
        assert!(answer.status().is_success(), "the prompt is accepted");

        loop {
            let event = next_json(&mut self.socket).await;
            let data = &event["data"];
            let done = event["type"] == "executing" && data["node"].is_null();
            if done && data["prompt_id"] == prompt_id.as_str() {
                break;
            }
        }

        let history: Value = self
            .http
            .get(format!("{}/history/{prompt_id}", self.base))
            .send()
            .await
            .expect("GET /history")
            .json()
            .await
            .expect("history is JSON");
        let image = &history[&prompt_id]["outputs"]["3"]["images"][0];
        let mut view = self
            .http
            .get(format!("{}/view", self.base))
            .query(&[
                ("filename", image["filename"].as_str().unwrap_or_default()),
                ("subfolder", image["subfolder"].as_str().unwrap_or_default()),
                ("type", image["type"].as_str().unwrap_or_default()),
            ])
            .send()
            .await
            .expect("GET /view");
        let mut file = std::fs::File::create(self.files.path().join("out.png")).expect("file");
        while let Some(chunk) = view.chunk().await.expect("the image streams") {
            file.write_all(&chunk).expect("the image is written");
        }
    }
}

/// A daemon on its own thread, with a data directory that goes away with it.
struct Daemon {
    thread: DaemonThread,
    base: String,
    http: reqwest::Client,
    socket: Socket,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(sims: &[&ComfySim]) -> Daemon {
        let mut config = String::new();
        for (index, sim) in sims.iter().enumerate() {
            config.push_str(&format!(
                "[[nodes]]\nname = \"gpu{index}\"\n[nodes.comfyui]\nurl = \"{}\"\n\
                 capabilities = [\"image\"]\n",
                sim.url()
            ));
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config_path = dir.path().join("multiplex.toml");
        std::fs::write(&config_path, config).expect("the config is written");
        let thread = DaemonThread::spawn(DaemonOptions {
            config: Some(config_path),
            bind: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.path().join("data")),
            ..DaemonOptions::default()
        })
        .expect("the daemon starts");
        let base = format!("http://{}", thread.addr);
        let mut socket = open_socket(format!("ws://{}/ws", thread.addr)).await;
        let subscribe = json!({"type": "subscribe"}).to_string();
        socket
            .send(awc::ws::Message::Text(subscribe.into()))
            .await
            .expect("subscribe is sent");
        while next_json(&mut socket).await["type"] != "subscribed" {}
        let daemon = Daemon {
            thread,
            base,
            http: reqwest::Client::new(),
            socket,
            _dir: dir,
        };
        daemon.wait_nodes(sims.len()).await;
        daemon
    }

    async fn wait_nodes(&self, count: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let health: Value = self
                .http
                .get(format!("{}/api/health", self.base))
                .send()
                .await
                .expect("GET /api/health")
                .json()
                .await
                .expect("health is JSON");
            if health["nodes_available"].as_u64() == Some(count as u64) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the nodes never came up: {health}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn submit(http: &reqwest::Client, base: &str, workflow: &Value) -> String {
        let answer = http
            .post(format!("{base}/api/workflows"))
            .json(workflow)
            .send()
            .await
            .expect("POST /api/workflows");
        assert_eq!(answer.status().as_u16(), 201, "the workflow is accepted");
        let body: Value = answer.json().await.expect("the answer is JSON");
        body["id"]
            .as_str()
            .expect("the answer has an id")
            .to_string()
    }

    /// Reads activity until every run in `pending` has ended; each must have succeeded.
    async fn wait_runs(&mut self, pending: &mut HashSet<String>) {
        while !pending.is_empty() {
            let event = next_json(&mut self.socket).await;
            match event["type"].as_str() {
                Some("run_state") => {
                    let state = event["state"].as_str().unwrap_or_default();
                    if matches!(state, "succeeded" | "failed" | "cancelled") {
                        let run = event["run_id"].as_str().unwrap_or_default();
                        assert_eq!(state, "succeeded", "run {run} ended {event}");
                        pending.remove(run);
                    }
                }
                Some("missed") => {
                    self.poll_runs(pending).await;
                }
                _ => {}
            }
        }
    }

    /// Catches up over REST after the activity stream dropped events for this slow client.
    async fn poll_runs(&self, pending: &mut HashSet<String>) {
        let mut ended = Vec::new();
        for run in pending.iter() {
            let view: Value = self
                .http
                .get(format!("{}/api/workflows/{run}", self.base))
                .send()
                .await
                .expect("GET a run")
                .json()
                .await
                .expect("the run is JSON");
            if matches!(
                view["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                assert_eq!(view["state"], "succeeded", "{view}");
                ended.push(run.clone());
            }
        }
        for run in ended {
            pending.remove(&run);
        }
    }

    async fn run_one(&mut self, workflow: &Value) {
        let id = Self::submit(&self.http, &self.base, workflow).await;
        self.wait_runs(&mut HashSet::from([id])).await;
    }

    /// Submits `count` copies of `workflow` with `SUBMITTERS` in flight and waits for all of
    /// them; answers runs per second from the first submission to the last end.
    async fn batch(&mut self, workflow: &Value, count: usize) -> f64 {
        let started = Instant::now();
        let http = self.http.clone();
        let base = self.base.clone();
        let ids: Vec<String> = futures_util::stream::iter(0..count)
            .map(|_| Self::submit(&http, &base, workflow))
            .buffer_unordered(SUBMITTERS)
            .collect()
            .await;
        let mut pending: HashSet<String> = ids.into_iter().collect();
        self.wait_runs(&mut pending).await;
        count as f64 / started.elapsed().as_secs_f64()
    }
}

fn comfy_run() -> Value {
    json!({"name": "bench", "nodes": [{"id": "invert", "type": "comfyui",
           "data": {"output": "image", "workflow": invert_prompt()}}], "edges": []})
}

fn daemon_only_run() -> Value {
    json!({"name": "bench text", "nodes": [
            {"id": "brief", "type": "intent", "data": {"prompt": "a lighthouse at dusk"}},
            {"id": "deliver", "type": "output", "data": {}}],
           "edges": [{"id": "e", "source": "brief", "target": "deliver"}]})
}

/// Per-step figures, in milliseconds.
struct Latency {
    median: f64,
    p90: f64,
    mean: f64,
}

fn latency(mut samples: Vec<f64>) -> Latency {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Latency {
        median: at(0.5),
        p90: at(0.9),
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
    }
}

/// Times one sample of a step; the first `WARMUP` samples are dropped.
fn record(samples: &mut Vec<f64>, index: usize, started: Instant) {
    if index >= WARMUP {
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
}

fn say(line: String) {
    // A bench prints its figures; stdout is where cargo bench shows them.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    actix_rt::System::new().block_on(async {
        let loopback = "127.0.0.1:0".parse().expect("an address");
        let mut sims = Vec::new();
        for _ in 0..4 {
            sims.push(
                ComfySim::start(zero_work(), loopback)
                    .await
                    .expect("a simulator"),
            );
        }

        say(format!(
            "overhead: {STEPS} sequential steps per way, after {WARMUP} warm-up"
        ));
        let mut direct = DirectClient::connect(&sims[0]).await;
        let mut samples = Vec::with_capacity(STEPS);
        for index in 0..WARMUP + STEPS {
            let started = Instant::now();
            direct.run_one().await;
            record(&mut samples, index, started);
        }
        let baseline = latency(samples);
        drop(direct);

        let mut daemon = Daemon::start(&[&sims[0]]).await;
        let workflow = comfy_run();
        let mut samples = Vec::with_capacity(STEPS);
        for index in 0..WARMUP + STEPS {
            let started = Instant::now();
            daemon.run_one(&workflow).await;
            record(&mut samples, index, started);
        }
        let through = latency(samples);
        for (way, figures) in [
            ("direct client", &baseline),
            ("through multiplex", &through),
        ] {
            say(format!(
                "  {way:<18} median {:>6.2} ms  p90 {:>6.2} ms  mean {:>6.2} ms",
                figures.median, figures.p90, figures.mean
            ));
        }
        say(format!(
            "  multiplex adds     median {:>6.2} ms  p90 {:>6.2} ms  mean {:>6.2} ms",
            through.median - baseline.median,
            through.p90 - baseline.p90,
            through.mean - baseline.mean
        ));
        daemon.thread.stop().await;

        say(format!(
            "throughput: batches of {BATCH} runs, {SUBMITTERS} submissions in flight"
        ));
        let mut daemon = Daemon::start(&sims.iter().collect::<Vec<_>>()).await;
        let comfy = daemon.batch(&comfy_run(), BATCH).await;
        say(format!(
            "  one ComfyUI step, 4 simulators  {comfy:>8.0} runs/s"
        ));
        let text = daemon.batch(&daemon_only_run(), BATCH).await;
        say(format!(
            "  intent -> output (daemon only)  {text:>8.0} runs/s"
        ));
        daemon.thread.stop().await;

        for sim in sims {
            sim.stop().await;
        }
    });
}
