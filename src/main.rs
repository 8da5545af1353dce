//! The `multiplex` command: the daemon, its CLI clients, the demo and the simulators.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use multiplex::client::{self, DaemonClient};
use multiplex::config;
use multiplex::daemon::{self, DaemonOptions};
use multiplex::{harness, soak};
use multiplex_sim::comfyui::{ComfySim, ComfySimConfig};
use multiplex_sim::langflow::{LangflowSim, LangflowSimConfig};
use tracing_subscriber::EnvFilter;
use url::Url;

/// Coordination daemon for a small GPU cluster running ComfyUI and LangFlow.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (on the built-in simulated cluster unless --config names another).
    Serve {
        /// Cluster config (TOML, see config/cluster.example.toml); the built-in simulated
        /// four-box cluster when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, e.g. 127.0.0.1:7700 (port 0 picks a free one); overrides the
        /// config's [daemon] bind.
        #[arg(long)]
        bind: Option<String>,
        /// Where runs (sled) and artifacts are kept; overrides the config's [daemon]
        /// data_dir (default ./multiplex-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Serve without [daemon] tokens on a non-loopback address (refused otherwise).
        #[arg(long)]
        allow_open: bool,
    },
    /// Start a daemon on the built-in simulated cluster, run the example workflow with live
    /// progress, print where each artifact is, and exit.
    Demo {
        /// Where the demo keeps its store and artifacts.
        #[arg(long, default_value = "multiplex-demo-data")]
        data_dir: PathBuf,
        /// A workflow file to run instead of the built-in example.
        #[arg(long)]
        workflow: Option<PathBuf>,
    },
    /// Submit a workflow file to a running daemon.
    Submit {
        file: PathBuf,
        /// Follow the run with progress bars until it ends.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        server: Server,
    },
    /// Show recent runs, or one run's steps.
    Status {
        run: Option<String>,
        #[command(flatten)]
        server: Server,
    },
    /// Cancel a run.
    Cancel {
        run: String,
        #[command(flatten)]
        server: Server,
    },
    /// Show the cluster's nodes.
    Nodes {
        /// Start this node's actor over first: its event socket is reopened and its
        /// running tasks are followed again, none sent twice.
        #[arg(long, value_name = "NODE")]
        restart: Option<String>,
        #[command(flatten)]
        server: Server,
    },
    /// Show the daemon's SSH tunnels: state, since when, reconnects, channels, bytes moved.
    Tunnels {
        /// Make this node's tunnel start over first (also a failed one).
        #[arg(long, value_name = "NODE")]
        reconnect: Option<String>,
        #[command(flatten)]
        server: Server,
    },
    /// Serve MCP over stdio, relayed to a running daemon's /mcp (for MCP clients that
    /// spawn their servers; see docs/mcp.md).
    Mcp {
        #[command(flatten)]
        server: Server,
    },
    /// Run a protocol-faithful simulator of a service, for tests and demos without GPUs.
    Sim {
        #[command(subcommand)]
        service: SimService,
    },
    /// Durability soak: simulators and a daemon as child processes, N runs, K kill -9s of
    /// the daemon or a simulator at random moments, then a report of what was lost or
    /// done twice. Exits non-zero when anything was.
    Soak {
        /// Workflows to submit (a mix of config/workflows/).
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Processes to kill -9 (and restart) while the runs are in flight.
        #[arg(long, default_value_t = 5)]
        kills: usize,
        /// Seed of the kill schedule and workflow mix; a random one when absent.
        #[arg(long)]
        seed: Option<u64>,
    },
}

#[derive(clap::Args)]
struct Server {
    /// The daemon's base URL.
    #[arg(long, env = "MULTIPLEX_URL", default_value = "http://127.0.0.1:7700")]
    url: Url,
    /// The environment variable holding the daemon's bearer token [default:
    /// MULTIPLEX_TOKEN, where unset means no token]. There is no flag for the token itself:
    /// a command line is visible to everyone on the machine.
    #[arg(long, value_name = "VAR")]
    token_env: Option<String>,
}

impl Server {
    /// A client for the daemon, sending the token if there is one.
    fn client(&self) -> anyhow::Result<DaemonClient> {
        Ok(DaemonClient::new(self.url.clone()).with_credential(self.credential()?))
    }

    fn credential(&self) -> anyhow::Result<Option<client::Credential>> {
        client::Credential::from_env(self.token_env.as_deref())
    }
}

#[derive(Subcommand)]
enum SimService {
    /// A ComfyUI simulator (REST + WebSocket, as ComfyUI 0.3 speaks them).
    Comfyui {
        #[arg(long, default_value_t = 8188)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[command(flatten)]
        settings: ComfySimArgs,
    },
    /// A LangFlow simulator (the run API of LangFlow 1.x).
    Langflow {
        #[arg(long, default_value_t = 7860)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Delay per generated token of the flows that stand for an LLM.
        #[arg(long)]
        token_delay_ms: Option<u64>,
        /// Require this `x-api-key`.
        #[arg(long)]
        api_key: Option<String>,
    },
}

/// The ComfyUI simulator's settings and test switches; unset ones keep the simulator's
/// defaults. The switches can also be changed at run time with `POST /sim/control`.
#[derive(clap::Args)]
struct ComfySimArgs {
    /// Time per sampler step and per ordinary node.
    #[arg(long)]
    step_ms: Option<u64>,
    /// Time of the first load of a model file.
    #[arg(long)]
    model_load_ms: Option<u64>,
    /// Size of each binary preview frame (0 = none).
    #[arg(long)]
    preview_bytes: Option<usize>,
    /// Total VRAM in MiB.
    #[arg(long)]
    vram_mb: Option<u64>,
    /// A model file the server has (repeatable); none accepts any model name.
    #[arg(long = "model")]
    models: Vec<String>,
    /// Fail the next N prompts with a RuntimeError.
    #[arg(long)]
    fail_next: Option<u32>,
    /// Fail the next N prompts with torch.OutOfMemoryError.
    #[arg(long)]
    oom_next: Option<u32>,
    /// Send no WebSocket frames while set; prompts still run.
    #[arg(long)]
    stall: bool,
    /// For the next N prompts, close the submitter's socket after the first node.
    #[arg(long)]
    drop_socket_next: Option<u32>,
    /// Answer WebSocket upgrades with 503.
    #[arg(long)]
    refuse_ws: bool,
    /// Ignore the client's prompt id and mint one, like older ComfyUI; `/interrupt` then
    /// ignores its body too.
    #[arg(long)]
    mint_prompt_ids: bool,
}

impl ComfySimArgs {
    fn into_config(self) -> ComfySimConfig {
        let mut config = ComfySimConfig::default();
        let switches = &mut config.switches;
        switches.fail_next = self.fail_next.unwrap_or(switches.fail_next);
        switches.oom_next = self.oom_next.unwrap_or(switches.oom_next);
        switches.stall |= self.stall;
        switches.drop_socket_next = self.drop_socket_next.unwrap_or(switches.drop_socket_next);
        switches.refuse_ws |= self.refuse_ws;
        switches.mint_prompt_ids |= self.mint_prompt_ids;
        config.step_ms = self.step_ms.unwrap_or(config.step_ms);
        config.model_load_ms = self.model_load_ms.unwrap_or(config.model_load_ms);
        config.preview_bytes = self.preview_bytes.unwrap_or(config.preview_bytes);
        config.vram_mb = self.vram_mb.unwrap_or(config.vram_mb);
        if !self.models.is_empty() {
            config.models = self.models;
        }
        config
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Commands that draw progress bars keep logs to what needs attention, so bars stay
    // readable; the step's own errors are part of what they print.
    let default_level = match cli.command {
        Command::Demo { .. } => "error",
        // stdout carries the protocol; keep stderr for what goes wrong.
        Command::Mcp { .. } => "warn",
        Command::Submit { .. } | Command::Soak { .. } => "warn",
        _ => "info",
    };
    init_tracing(default_level);
    let result = daemon::run_system(run(cli.command));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; RUST_LOG overrides the level.
fn init_tracing(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a terminal; in a log file or journal they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Serve {
            config,
            bind,
            data_dir,
            allow_open,
        } => {
            let daemon = daemon::start(DaemonOptions {
                config,
                bind,
                data_dir,
                allow_open,
                environment: None,
            })
            .await?;
            announce(daemon.addr)?;
            tracing::info!(url = %daemon.url(), "ready; press Ctrl-C to stop");
            wait_for_shutdown_signal().await?;
            daemon.stop().await;
        }
        Command::Demo { data_dir, workflow } => return demo(data_dir, workflow).await,
        Command::Submit { file, wait, server } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let workflow: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", file.display()))?;
            let daemon = server.client()?;
            let run = daemon.submit(&workflow).await?;
            let id = run["id"].as_str().unwrap_or_default().to_string();
            // Ignore a closed pipe (`| head`): the run was submitted either way.
            let _ = writeln!(std::io::stdout(), "submitted run {id}");
            if wait {
                let finished = client::follow_run(&daemon, &id).await?;
                client::print_run_summary(&finished, Some(&server.url), None);
                return Ok(exit_code_for(&finished));
            }
        }
        Command::Status { run, server } => {
            let daemon = server.client()?;
            match run {
                Some(id) => client::print_run_table(&daemon.run(&id).await?),
                None => client::print_runs_table(&daemon.runs(50).await?),
            }
        }
        Command::Mcp { server } => {
            multiplex::mcp::relay::run(&server.url, server.credential()?).await?
        }
        Command::Cancel { run, server } => {
            let daemon = server.client()?;
            client::print_run_table(&daemon.cancel(&run).await?);
        }
        Command::Nodes { restart, server } => {
            let daemon = server.client()?;
            if let Some(node) = restart {
                let answer = daemon.restart_node(&node).await?;
                let restarts = answer["restarts"].as_u64().unwrap_or_default();
                let _ = writeln!(std::io::stdout(), "restarted {node} (restart {restarts})");
            }
            client::print_nodes_table(&daemon.nodes().await?);
        }
        Command::Tunnels { reconnect, server } => {
            let daemon = server.client()?;
            if let Some(node) = reconnect {
                daemon.reconnect_tunnel(&node).await?;
            }
            client::print_tunnels_table(&daemon.tunnels().await?);
        }
        Command::Sim { service } => run_sim(service).await?,
        Command::Soak { runs, kills, seed } => {
            let options = soak::SoakOptions {
                runs,
                kills,
                seed,
                ..soak::SoakOptions::default()
            };
            let report = soak::run(options).await?;
            let _ = writeln!(std::io::stdout(), "{report}");
            if !report.clean() {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs a simulator until Ctrl-C or SIGTERM. The `multiplex_sim::serve_*_forever` entry points
/// do not say which port they bound, so this starts the stoppable servers, which do.
async fn run_sim(service: SimService) -> anyhow::Result<()> {
    match service {
        SimService::Comfyui {
            port,
            host,
            settings,
        } => {
            let addr = SocketAddr::new(host, port);
            let sim = ComfySim::start(settings.into_config(), addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            announce(sim.addr())?;
            wait_for_shutdown_signal().await?;
            sim.stop().await;
        }
        SimService::Langflow {
            port,
            host,
            token_delay_ms,
            api_key,
        } => {
            let addr = SocketAddr::new(host, port);
            let mut config = LangflowSimConfig::default();
            config.token_delay_ms = token_delay_ms.unwrap_or(config.token_delay_ms);
            config.api_key = api_key;
            let sim = LangflowSim::start(config, addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            announce(sim.addr())?;
            wait_for_shutdown_signal().await?;
            sim.stop().await;
        }
    }
    Ok(())
}

/// The readiness line: a parent that started us with port 0 reads the address from it
/// (see [`multiplex::harness`]). Printed only once the socket is bound, then flushed,
/// because stdout is a pipe there and would otherwise hold the line back.
fn announce(addr: SocketAddr) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}{}", harness::READY_PREFIX, harness::base_url(addr))
        .and_then(|()| out.flush())
        .context("cannot write the readiness line to stdout")
}

/// Waits for Ctrl-C (SIGINT) or, on Unix, SIGTERM: what systemd and `kill` send.
async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("cannot wait for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("cannot wait for Ctrl-C"),
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot wait for Ctrl-C")
    }
}

/// Exit 0 only when the run succeeded, so scripts can rely on `submit --wait`.
fn exit_code_for(run: &serde_json::Value) -> std::process::ExitCode {
    if run["state"] == "succeeded" {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// The whole system on one machine: simulated cluster, daemon, the example workflow.
async fn demo(
    data_dir: PathBuf,
    workflow: Option<PathBuf>,
) -> anyhow::Result<std::process::ExitCode> {
    let document: serde_json::Value = match &workflow {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?
        }
        None => serde_json::from_str(&config::embedded_text("workflows/lighthouse.json")?)
            .context("the built-in example workflow is not JSON")?,
    };
    let options = DaemonOptions {
        config: None,
        bind: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.clone()),
        ..DaemonOptions::default()
    };
    let daemon = daemon::start(options).await?;
    let url = daemon.url();
    eprintln!(
        "multiplex demo: daemon on {url}, data in {}",
        data_dir.display()
    );

    let client = DaemonClient::new(url.clone());
    wait_for_nodes(&client).await?;
    let run = client.submit(&document).await?;
    let id = run["id"].as_str().unwrap_or_default().to_string();
    eprintln!(
        "submitted run {id} ({})",
        run["name"].as_str().unwrap_or("untitled")
    );
    let finished = client::follow_run(&client, &id).await;
    let code = match &finished {
        Ok(run) => {
            // No links: they would point at this demo's daemon, which stops right after.
            client::print_run_summary(run, None, None);
            let outputs = data_dir.join("outputs").join(&id);
            match export_artifacts(run, &data_dir, &outputs) {
                Ok(files) => print_exported(&outputs, &files),
                Err(err) => eprintln!("could not copy the artifacts out: {err:#}"),
            }
            exit_code_for(run)
        }
        Err(_) => std::process::ExitCode::FAILURE,
    };
    daemon.stop().await;
    finished.map(|_| code)
}

/// Links every step's artifacts into `outputs` as `<step>-<file name>`, so they can be
/// opened by name and extension (the store keeps them under their hash). Returns
/// `(step, kind, path)` for each.
fn export_artifacts(
    run: &serde_json::Value,
    data_dir: &Path,
    outputs: &Path,
) -> anyhow::Result<Vec<(String, String, PathBuf)>> {
    std::fs::create_dir_all(outputs)
        .with_context(|| format!("cannot create {}", outputs.display()))?;
    let mut exported = Vec::new();
    // Names already given, by artifact: two step ids can clean up to the same name.
    let mut taken: std::collections::HashMap<String, String> = Default::default();
    let steps = run["steps"].as_array().cloned().unwrap_or_default();
    // The output step re-lists its inputs' artifacts; link each file once, under its maker.
    for step in steps.iter().filter(|step| step["kind"] != "output") {
        let step_id = step["id"].as_str().unwrap_or("step");
        for artifact in step["artifacts"].as_array().into_iter().flatten() {
            let (Some(id), Some(filename)) =
                (artifact["id"].as_str(), artifact["filename"].as_str())
            else {
                continue;
            };
            let Some(source) = artifact_file(data_dir, id) else {
                continue;
            };
            let mut name = safe_file_name(&format!("{step_id}-{filename}"));
            if taken.get(&name).is_some_and(|owner| owner != id) {
                name = safe_file_name(&format!("{}-{name}", &id[..12]));
            }
            taken.insert(name.clone(), id.to_string());
            let target = outputs.join(name);
            if !target.exists() && std::fs::hard_link(&source, &target).is_err() {
                std::fs::copy(&source, &target)
                    .with_context(|| format!("cannot copy {}", source.display()))?;
            }
            let kind = artifact["kind"].as_str().unwrap_or("data").to_string();
            exported.push((step_id.to_string(), kind, target));
        }
    }
    Ok(exported)
}

/// The stored file of an artifact; ids are hex digests, anything else is refused.
fn artifact_file(data_dir: &Path, id: &str) -> Option<PathBuf> {
    let valid = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| data_dir.join("artifacts").join(&id[..2]).join(id))
}

/// Keeps a file name to letters, digits and `._-`, so names made of step ids and service
/// file names stay in the folder, and to a length every file system takes.
fn safe_file_name(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    multiplex_actors::artifact::safe_filename(&ascii)
}

fn print_exported(outputs: &Path, files: &[(String, String, PathBuf)]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\nartifacts in {}:", outputs.display());
    for (step, kind, path) in files {
        // A step id is the document's text: escaped, so it cannot move the cursor.
        let step = step.escape_debug().to_string();
        let _ = writeln!(out, "  {step:<10} {kind:<6} {}", path.display());
    }
}

/// Simulated nodes come up within moments; waiting for them keeps the demo's first steps
/// from queueing behind node startup.
async fn wait_for_nodes(client: &DaemonClient) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let nodes = client.nodes().await?;
        let list = nodes["nodes"].as_array().cloned().unwrap_or_default();
        if !list.is_empty() && list.iter().all(|node| node["available"] == true) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("simulated nodes did not become available: {nodes}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `err` and its causes joined by ": ", leaving out a cause whose text is already there.
/// Many of our errors name their source in their own message (so that a log line reads
/// whole), and anyhow's `{:#}` would print it a second time: "... (os error 2): ... (os error
/// 2)".
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;
    use serde_json::json;

    #[test]
    fn exported_names_stay_in_the_folder_and_apart() {
        let data = tempfile::tempdir().unwrap();
        let ids = ["a".repeat(64), "b".repeat(64)];
        for id in &ids {
            let dir = data.path().join("artifacts").join(&id[..2]);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(id), id).unwrap();
        }
        let artifact = |id: &str| json!([{"id": id, "filename": "x.txt", "kind": "text"}]);
        let long = "s".repeat(400);
        let run = json!({"steps": [
            {"id": "../../../../tmp/pwned", "kind": "intent", "artifacts": artifact(&ids[0])},
            {"id": "..\\..\\..\\..\\tmp\\pwned", "kind": "intent",
             "artifacts": artifact(&ids[1])},
            {"id": long, "kind": "intent", "artifacts": artifact(&ids[1])}]});
        let outputs = data.path().join("outputs").join("run");
        let files = super::export_artifacts(&run, data.path(), &outputs).unwrap();
        assert_eq!(files.len(), 3);
        for (_, _, path) in &files {
            assert_eq!(path.parent(), Some(outputs.as_path()), "{}", path.display());
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(name.len() <= 120 && name.ends_with(".txt"), "{name}");
        }
        assert_eq!(std::fs::read_to_string(&files[0].2).unwrap(), ids[0]);
        assert_eq!(std::fs::read_to_string(&files[1].2).unwrap(), ids[1]);
        assert_ne!(files[0].2, files[1].2);
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read dir x: {source}")]
        struct ReadDir {
            source: std::io::Error,
        }
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone (os error 2)");
        let err = Err::<(), _>(ReadDir { source: io })
            .context("cannot load templates")
            .unwrap_err();
        assert_eq!(
            super::error_chain(&err),
            "cannot load templates: cannot read dir x: gone (os error 2)"
        );

        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_chain(&plain), "outer: inner");
    }
}
