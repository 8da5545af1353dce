//! Simulators and a daemon as separate processes, for tests and the soak that kill them.
//!
//! The in-process tests (`tests/e2e`) stop a daemon politely; durability is about the
//! impolite case. A `kill -9` leaves sled mid-write, sockets half-open and prompts queued on
//! servers that outlive the daemon, and only a real process can be killed that way. This
//! module starts `multiplex sim comfyui|langflow` and `multiplex serve` as children, learns
//! each one's address from its readiness line (`listening on http://127.0.0.1:PORT/`, printed
//! once it listens, so every child can start on port 0), writes a config whose nodes point at
//! the simulators, and kills and restarts any of them: a simulator on the port it had, so the
//! daemon finds it again; the daemon on the data directory it had, so it resumes.
//!
//! Every child's stderr goes to a file in the harness's temporary folder. Dropping the
//! harness kills every child; when that happens during a panic (a failed test), the logs are
//! printed first, since they are the only account of what the processes did.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use url::Url;

/// What a `multiplex` server prints, followed by its base URL, once it listens.
pub const READY_PREFIX: &str = "listening on ";
/// How long a child may take to print its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a restart keeps retrying a port still held by the killed process's sockets.
const REBIND_PATIENCE: Duration = Duration::from_secs(10);
/// Pause between two polls of a condition, and between two tries of a busy port.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Bound on one HTTP request to a child; a hung child fails the call, not the caller.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of each log [`Harness::logs`] shows.
const LOG_TAIL_BYTES: usize = 6000;

/// `http://ADDR/`, the base URL a readiness line carries.
pub fn base_url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

/// The URL of a readiness line, or `None` for any other line.
pub fn parse_ready_line(line: &str) -> Option<Url> {
    let rest = line.trim().strip_prefix(READY_PREFIX)?;
    Url::parse(rest.trim()).ok()
}

/// A ComfyUI node of the cluster: its simulator's flags and the capabilities the config
/// gives it.
#[derive(Debug, Clone)]
pub struct ComfyNode {
    pub name: String,
    pub capabilities: Vec<String>,
    /// Extra `multiplex sim comfyui` flags (`--step-ms 50`, `--refuse-ws`...).
    pub sim_args: Vec<String>,
}

/// A LangFlow node of the cluster.
#[derive(Debug, Clone)]
pub struct LangflowNode {
    pub name: String,
    /// Extra `multiplex sim langflow` flags.
    pub sim_args: Vec<String>,
}

/// The cluster a harness starts.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub comfyui: Vec<ComfyNode>,
    pub langflow: Vec<LangflowNode>,
    /// `[daemon] node_grace_ms`: short, so tests see work move off a lost node quickly.
    pub node_grace_ms: u64,
}

impl ClusterSpec {
    /// Two image nodes (`img-a` with 24 GiB, `img-b` with 48 GiB, so an out-of-memory retry
    /// has somewhere roomier to go), a video node `vid` and a LangFlow node `llm`: enough
    /// for every example workflow. Image sampler steps take `image_step_ms`.
    pub fn standard(image_step_ms: u64) -> ClusterSpec {
        let image = |name: &str, vram_mb: u64| ComfyNode {
            name: name.into(),
            capabilities: vec!["image".into()],
            sim_args: sim_flags(&[
                ("--step-ms", image_step_ms),
                ("--model-load-ms", 1),
                ("--vram-mb", vram_mb),
            ]),
        };
        ClusterSpec {
            comfyui: vec![
                image("img-a", 24_576),
                image("img-b", 49_152),
                ComfyNode {
                    name: "vid".into(),
                    capabilities: vec!["video".into()],
                    sim_args: sim_flags(&[("--step-ms", 2), ("--model-load-ms", 1)]),
                },
            ],
            langflow: vec![LangflowNode {
                name: "llm".into(),
                sim_args: sim_flags(&[("--token-delay-ms", 1)]),
            }],
            node_grace_ms: 2_000,
        }
    }

    /// The node's simulator flags, for a test that wants to add one.
    pub fn comfy_mut(&mut self, name: &str) -> Option<&mut ComfyNode> {
        self.comfyui.iter_mut().find(|node| node.name == name)
    }

    /// The daemon's config: every node points at its simulator's URL.
    fn config_toml(&self, urls: &[(String, Url)]) -> String {
        let url_of = |name: &str| {
            urls.iter()
                .find(|(n, _)| n == name)
                .map(|(_, url)| url.to_string())
                .unwrap_or_default()
        };
        let mut text = format!(
            "[daemon]\nnode_grace_ms = {}\n\n[templates]\nimage = \"flux-txt2img\"\n\
             video = \"wan21-i2v\"\n",
            self.node_grace_ms
        );
        for node in &self.comfyui {
            let capabilities: Vec<String> =
                node.capabilities.iter().map(|c| format!("{c:?}")).collect();
            let _ = write!(
                text,
                "\n[[nodes]]\nname = {name:?}\ngpus = [{{ model = \"RTX A6000\", \
                 vram_mb = 49140 }}]\n[nodes.comfyui]\nurl = {url:?}\ncapabilities = [{caps}]\n",
                name = node.name,
                url = url_of(&node.name),
                caps = capabilities.join(", "),
            );
        }
        for node in &self.langflow {
            let _ = write!(
                text,
                "\n[[nodes]]\nname = {name:?}\nslots = 4\n[nodes.langflow]\nurl = {url:?}\n\
                 flows.\"narration-text\" = {{ id = \"narration-text\" }}\n\
                 flows.\"narration-visual\" = {{ id = \"{VISUAL_FLOW_ID}\", \
                 file_component = \"ChatInput-aaaa1\" }}\n\
                 flows.\"prompt-expansion\" = {{ id = \"prompt-expansion\" }}\n",
                name = node.name,
                url = url_of(&node.name),
            );
        }
        text
    }
}

/// The simulator's visual narration flow: uploads need the flow's id, not its name.
const VISUAL_FLOW_ID: &str = "6f1c3a52-2a8e-4d5b-9a41-0c1e5d7b8a02";

fn sim_flags(flags: &[(&str, u64)]) -> Vec<String> {
    flags
        .iter()
        .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
        .collect()
}

/// Which service a simulator plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Comfyui,
    Langflow,
}

/// One child process and how to start it again.
struct Proc {
    /// Node name, or `daemon`.
    name: String,
    /// Arguments after the binary; a simulator's `--port` comes from `port`.
    args: Vec<String>,
    /// A simulator's port once known: it restarts there, so the daemon finds it again.
    port: Option<u16>,
    child: Option<Child>,
    url: Url,
    log: PathBuf,
    /// Starts so far, for the log separators.
    starts: u32,
}

impl Proc {
    /// Simulators keep their port across restarts; the daemon binds a new one each time.
    fn is_sim(&self) -> bool {
        self.args.first().is_some_and(|arg| arg == "sim")
    }
}

/// Simulators and a daemon running as child processes. See the module docs.
pub struct Harness {
    binary: PathBuf,
    /// Logs, the config and the data directory; removed on drop.
    dir: tempfile::TempDir,
    spec: ClusterSpec,
    sims: Vec<(Service, Proc)>,
    daemon: Option<Proc>,
    http: reqwest::Client,
}

impl Harness {
    /// Starts every simulator of `spec`, writes the config and starts the daemon; returns
    /// once every node is available, unless a simulator was told to refuse its socket.
    pub async fn start(binary: impl Into<PathBuf>, spec: ClusterSpec) -> anyhow::Result<Harness> {
        let dir = tempfile::Builder::new()
            .prefix("multiplex-harness")
            .tempdir()
            .context("cannot create the harness's temporary folder")?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build an HTTP client")?;
        let mut harness = Harness {
            binary: binary.into(),
            dir,
            spec: spec.clone(),
            sims: Vec::new(),
            daemon: None,
            http,
        };
        for node in &spec.comfyui {
            harness.add_sim(Service::Comfyui, &node.name, &node.sim_args);
        }
        for node in &spec.langflow {
            harness.add_sim(Service::Langflow, &node.name, &node.sim_args);
        }
        for index in 0..harness.sims.len() {
            let binary = harness.binary.clone();
            start_proc(&binary, &mut harness.sims[index].1).await?;
        }
        harness.write_config()?;
        harness.start_daemon().await?;
        let refusing = spec
            .comfyui
            .iter()
            .any(|node| node.sim_args.iter().any(|arg| arg == "--refuse-ws"));
        if !refusing {
            harness.wait_nodes_available().await?;
        }
        Ok(harness)
    }

    fn add_sim(&mut self, service: Service, name: &str, extra: &[String]) {
        let kind = match service {
            Service::Comfyui => "comfyui",
            Service::Langflow => "langflow",
        };
        let mut args = vec!["sim".to_string(), kind.to_string()];
        args.extend(extra.iter().cloned());
        let proc = self.new_proc(name, args);
        self.sims.push((service, proc));
    }

    fn new_proc(&self, name: &str, args: Vec<String>) -> Proc {
        Proc {
            name: name.to_string(),
            args,
            port: None,
            child: None,
            // Replaced by the readiness line's URL on start.
            url: Url::parse("http://127.0.0.1/").expect("a static URL parses"),
            log: self.dir.path().join(format!("{name}.log")),
            starts: 0,
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("multiplex.toml")
    }

    /// The daemon's data directory, kept across its restarts.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let urls: Vec<(String, Url)> = self
            .sims
            .iter()
            .map(|(_, proc)| (proc.name.clone(), proc.url.clone()))
            .collect();
        let path = self.config_path();
        std::fs::write(&path, self.spec.config_toml(&urls))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Starts the daemon on the config and data directory (again, after a kill).
    pub async fn start_daemon(&mut self) -> anyhow::Result<()> {
        if self.daemon.as_ref().is_some_and(|d| d.child.is_some()) {
            bail!("the daemon is already running");
        }
        let args = vec![
            "serve".to_string(),
            "--config".to_string(),
            self.config_path().display().to_string(),
            "--bind".to_string(),
            "127.0.0.1:0".to_string(),
            "--data-dir".to_string(),
            self.data_dir().display().to_string(),
        ];
        let mut daemon = match self.daemon.take() {
            Some(daemon) => daemon,
            None => self.new_proc("daemon", args),
        };
        let started = start_proc(&self.binary, &mut daemon).await;
        self.daemon = Some(daemon);
        started
    }

    /// `kill -9` of the daemon; waits until the process is gone.
    pub async fn kill_daemon(&mut self) -> anyhow::Result<()> {
        let daemon = self.daemon.as_mut().context("no daemon was started")?;
        kill_proc(daemon).await
    }

    /// Kills the daemon and starts it again on the same data directory.
    pub async fn restart_daemon(&mut self) -> anyhow::Result<()> {
        self.kill_daemon().await?;
        self.start_daemon().await
    }

    /// `kill -9` of a simulator; waits until the process is gone.
    pub async fn kill_sim(&mut self, name: &str) -> anyhow::Result<()> {
        kill_proc(self.sim_mut(name)?).await
    }

    /// Starts a killed simulator again, empty, on the port it had.
    pub async fn start_sim(&mut self, name: &str) -> anyhow::Result<()> {
        let binary = self.binary.clone();
        start_proc(&binary, self.sim_mut(name)?).await
    }

    /// Kills a simulator and starts it again, empty, on the port it had.
    pub async fn restart_sim(&mut self, name: &str) -> anyhow::Result<()> {
        self.kill_sim(name).await?;
        self.start_sim(name).await
    }

    /// Whether the named simulator (or `daemon`) is running.
    pub fn is_running(&self, name: &str) -> bool {
        let proc = match name {
            "daemon" => self.daemon.as_ref(),
            _ => self.sims.iter().map(|(_, p)| p).find(|p| p.name == name),
        };
        proc.is_some_and(|p| p.child.is_some())
    }

    fn sim_mut(&mut self, name: &str) -> anyhow::Result<&mut Proc> {
        self.sims
            .iter_mut()
            .map(|(_, proc)| proc)
            .find(|proc| proc.name == name)
            .with_context(|| format!("no simulator named {name}"))
    }

    fn sim(&self, name: &str) -> anyhow::Result<&Proc> {
        self.sims
            .iter()
            .map(|(_, proc)| proc)
            .find(|proc| proc.name == name)
            .with_context(|| format!("no simulator named {name}"))
    }

    /// Names of the ComfyUI simulators.
    pub fn comfy_names(&self) -> Vec<String> {
        self.sim_names(Service::Comfyui)
    }

    /// Names of the LangFlow simulators.
    pub fn langflow_names(&self) -> Vec<String> {
        self.sim_names(Service::Langflow)
    }

    fn sim_names(&self, service: Service) -> Vec<String> {
        self.sims
            .iter()
            .filter(|(s, _)| *s == service)
            .map(|(_, proc)| proc.name.clone())
            .collect()
    }

    /// The daemon's base URL (it changes when the daemon restarts: it binds port 0).
    pub fn daemon_url(&self) -> anyhow::Result<&Url> {
        self.daemon
            .as_ref()
            .filter(|d| d.child.is_some())
            .map(|d| &d.url)
            .context("the daemon is not running")
    }

    /// A simulator's base URL.
    pub fn sim_url(&self, name: &str) -> anyhow::Result<&Url> {
        Ok(&self.sim(name)?.url)
    }

    /// `GET` on the daemon; the JSON body of a 2xx answer.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = join(self.daemon_url()?, path)?;
        self.get_json(url).await
    }

    /// `POST` of JSON to the daemon; the status and the JSON body (null when not JSON).
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let url = join(self.daemon_url()?, path)?;
        self.post_json(url, body).await
    }

    /// Submits a workflow; the run id.
    pub async fn submit(&self, workflow: &Value) -> anyhow::Result<String> {
        let (status, body) = self.post("/api/workflows", workflow).await?;
        if status != 201 {
            bail!("submission answered {status}: {body}");
        }
        body["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("the submission's answer has no id: {body}"))
    }

    /// A run's view.
    pub async fn run(&self, id: &str) -> anyhow::Result<Value> {
        self.get(&format!("/api/workflows/{id}")).await
    }

    /// A simulator's `GET /sim/stats`.
    pub async fn sim_stats(&self, name: &str) -> anyhow::Result<Value> {
        let url = join(self.sim_url(name)?, "/sim/stats")?;
        self.get_json(url).await
    }

    /// A simulator's `POST /sim/control`; its stats after the change.
    pub async fn sim_control(&self, name: &str, control: &Value) -> anyhow::Result<Value> {
        let url = join(self.sim_url(name)?, "/sim/control")?;
        let (status, body) = self.post_json(url, control).await?;
        if !(200..300).contains(&status) {
            bail!("{name} answered /sim/control with {status}: {body}");
        }
        Ok(body)
    }

    async fn get_json(&self, url: Url) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(url.clone())
            .send()
            .await
            .with_context(|| format!("GET {url} failed"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("GET {url} answered {status}: {body}");
        }
        Ok(body)
    }

    async fn post_json(&self, url: Url, body: &Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(url.clone())
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {url} failed"))?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Polls `check` until it yields a value or `patience` runs out. Errors of `check`
    /// (a daemon restarting, a refused connection) count as "not yet"; the last one is
    /// part of the timeout's message.
    pub async fn wait_for<T, F, Fut>(
        &self,
        what: &str,
        patience: Duration,
        mut check: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
    {
        let deadline = Instant::now() + patience;
        let mut last = String::new();
        loop {
            match check().await {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                Err(err) => last = format!("; last error: {err:#}"),
            }
            if Instant::now() > deadline {
                bail!("timed out after {patience:?} waiting for {what}{last}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until a run satisfies `done`, and returns its view.
    pub async fn wait_run(
        &self,
        id: &str,
        patience: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + patience;
        loop {
            let last = match self.run(id).await {
                Ok(run) if done(&run) => return Ok(run),
                Ok(run) => run.to_string(),
                Err(err) => format!("unreadable ({err:#})"),
            };
            if Instant::now() > deadline {
                bail!("timed out after {patience:?} waiting for run {id}; last seen: {last}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until a run has ended (succeeded, failed or cancelled), and returns its view.
    pub async fn wait_end(&self, id: &str, patience: Duration) -> anyhow::Result<Value> {
        self.wait_run(id, patience, run_ended).await
    }

    /// Waits until the daemon reports every node available.
    pub async fn wait_nodes_available(&self) -> anyhow::Result<()> {
        self.wait_for("every node to be available", READY_TIMEOUT, || async {
            let body = self.get("/api/nodes").await?;
            let nodes = body["nodes"].as_array().cloned().unwrap_or_default();
            let all = !nodes.is_empty() && nodes.iter().all(|node| node["available"] == true);
            Ok(all.then_some(()))
        })
        .await
    }

    /// The tail of every child's stderr, for a failure report.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        let procs = self.sims.iter().map(|(_, p)| p).chain(self.daemon.as_ref());
        for proc in procs {
            let _ = writeln!(text, "===== {} ({}) =====", proc.name, proc.log.display());
            text.push_str(&log_tail(&proc.log));
        }
        text
    }

    /// The whole stderr of a child (`daemon` or a node's simulator), over all its lives: what
    /// a test waits on when the daemon's log is the only sign of a step it must not miss.
    pub fn log(&self, name: &str) -> String {
        let path = self.dir.path().join(format!("{name}.log"));
        std::fs::read(path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Leaves the temporary folder (logs, config, data) in place when the harness goes, for
    /// a post-mortem.
    pub fn keep_files(&mut self) {
        self.dir.disable_cleanup(true);
    }

    /// Where the logs and data are, for messages.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // `start_kill` sends SIGKILL without waiting; the children were also spawned with
        // `kill_on_drop`, this only makes it happen before the temporary folder goes.
        let procs = self
            .sims
            .iter_mut()
            .map(|(_, p)| p)
            .chain(self.daemon.as_mut());
        for proc in procs {
            if let Some(child) = proc.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

/// Whether a run view shows a run that has ended.
pub fn run_ended(run: &Value) -> bool {
    matches!(
        run["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// The step of a run view with this id, or `Null`.
pub fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|step| step["id"] == id))
        .unwrap_or(&Value::Null)
}

fn join(base: &Url, path: &str) -> anyhow::Result<Url> {
    base.join(path.trim_start_matches('/'))
        .with_context(|| format!("{path} is not a path under {base}"))
}

fn log_tail(path: &Path) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return "(no log)\n".to_string();
    };
    let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
    let mut text = String::from_utf8_lossy(&bytes[start..]).into_owned();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// Starts a child and reads its readiness line. A simulator that had a port gets it again;
/// while the killed process's sockets still hold it, the start is retried for a while.
async fn start_proc(binary: &Path, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + REBIND_PATIENCE;
    loop {
        match spawn_ready(binary, proc).await {
            Ok((child, url)) => {
                if proc.is_sim() {
                    proc.port = proc.port.or(url.port());
                }
                proc.url = url;
                proc.child = Some(child);
                return Ok(());
            }
            Err(err) if proc.port.is_some() && Instant::now() < deadline => {
                tracing::debug!(name = %proc.name, error = %format!("{err:#}"),
                    "restart failed, trying the port again");
                tokio::time::sleep(POLL_INTERVAL * 4).await;
            }
            Err(err) => {
                let tail = log_tail(&proc.log);
                return Err(err.context(format!(
                    "{} did not start; its log ends:\n{tail}",
                    proc.name
                )));
            }
        }
    }
}

/// One try: spawns the child and waits for its readiness line.
async fn spawn_ready(binary: &Path, proc: &mut Proc) -> anyhow::Result<(Child, Url)> {
    proc.starts += 1;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&proc.log)
        .with_context(|| format!("cannot open {}", proc.log.display()))?;
    {
        use std::io::Write;
        let _ = writeln!(log, "----- start {} of {} -----", proc.starts, proc.name);
    }
    let mut command = Command::new(binary);
    command.args(&proc.args);
    if let Some(port) = proc.port {
        command.args(["--port", &port.to_string()]);
    } else if proc.is_sim() {
        command.args(["--port", "0"]);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        // Logs go to files; colour codes would only clutter them.
        .env("NO_COLOR", "1");
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let stdout = child
        .stdout
        .take()
        .context("the child's stdout is not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = parse_ready_line(&line) {
                return Ok(Some(url));
            }
        }
        Ok::<_, std::io::Error>(None)
    };
    let outcome = tokio::time::timeout(READY_TIMEOUT, read).await;
    match outcome {
        Ok(Ok(Some(url))) => Ok((child, url)),
        Ok(Ok(None)) => {
            let status = child.wait().await.ok();
            bail!("{} exited ({status:?}) before it listened", proc.name)
        }
        Ok(Err(err)) => {
            let _ = child.kill().await;
            Err(err).with_context(|| format!("cannot read {}'s stdout", proc.name))
        }
        Err(_) => {
            let _ = child.kill().await;
            bail!(
                "{} printed no readiness line within {READY_TIMEOUT:?}",
                proc.name
            )
        }
    }
}

/// SIGKILL, then waits for the process to be reaped.
async fn kill_proc(proc: &mut Proc) -> anyhow::Result<()> {
    let Some(mut child) = proc.child.take() else {
        bail!("{} is not running", proc.name);
    };
    child
        .kill()
        .await
        .with_context(|| format!("cannot kill {}", proc.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lines_give_the_url_and_nothing_else_does() {
        let url = parse_ready_line("listening on http://127.0.0.1:4321/\n");
        assert_eq!(url.and_then(|u| u.port()), Some(4321));
        assert!(parse_ready_line("INFO listening on").is_none());
        assert!(parse_ready_line("listening on not a url").is_none());
        assert_eq!(
            base_url("127.0.0.1:80".parse().expect("a socket address")),
            "http://127.0.0.1:80/"
        );
    }

    #[test]
    fn the_config_points_each_node_at_its_simulator() {
        let spec = ClusterSpec::standard(5);
        let urls: Vec<(String, Url)> = ["img-a", "img-b", "vid", "llm"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let url = Url::parse(&format!("http://127.0.0.1:{}/", 9000 + i)).expect("url");
                (name.to_string(), url)
            })
            .collect();
        let text = spec.config_toml(&urls);
        let parsed: toml::Value = toml::from_str(&text).expect("the config is TOML");
        let nodes = parsed["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 4);
        assert_eq!(
            nodes[1]["comfyui"]["url"].as_str(),
            Some("http://127.0.0.1:9001/")
        );
        assert_eq!(
            nodes[3]["langflow"]["url"].as_str(),
            Some("http://127.0.0.1:9003/")
        );
        assert_eq!(parsed["daemon"]["node_grace_ms"].as_integer(), Some(2000));
    }
}
