//! `multiplex soak`: many runs while the daemon and the simulators are killed at random.
//!
//! The process tests kill one thing at one chosen moment; the soak looks for the moments
//! nobody thought of. It starts a cluster through the [`harness`](crate::harness), submits
//! a mix of the example workflows, and `kill -9`s the daemon or a simulator whenever the
//! count of events so far (submissions plus runs ended) reaches one of K points drawn at
//! random, restarting what it killed after a random pause. Then it waits for every run to
//! end and counts:
//!
//! - runs that succeeded, failed, or never ended;
//! - runs lost: unknown to the daemon after a restart, though their submission was answered;
//! - prompts duplicated: a ComfyUI simulator asked twice to run the same prompt id;
//! - flow calls repeated: a LangFlow simulator asked twice to run the same session. LangFlow
//!   has no way to reattach to a call, and forgets a streamed answer whose client went away,
//!   so a call the daemon died during is made again (docs/durability.md). These are
//!   reported, not counted as a failure of the soak.
//!
//! A simulator's counters live in its process, so they are read just before it is killed
//! and added up; prompts posted in the instant between that read and the kill are missing
//! from `prompts received`, which is a total for information only.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::config;
use crate::harness::{ClusterSpec, Harness};

/// The example workflows the soak mixes.
const WORKFLOWS: [&str; 3] = [
    "workflows/lighthouse.json",
    "workflows/two-branches.json",
    "workflows/invert.json",
];
/// Pause between two rounds of submitting, polling and maybe killing.
const TICK: Duration = Duration::from_millis(50);
/// Longest pause between killing a process and starting it again.
const MAX_DOWNTIME: Duration = Duration::from_millis(1500);
/// Grace before a lost node's work moves elsewhere: below the longest downtime, so the
/// soak sees both a node coming back in time and work moving off one that did not.
const NODE_GRACE_MS: u64 = 1000;
/// Time per image sampler step: long enough that kills land mid-step.
const IMAGE_STEP_MS: u64 = 20;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct SoakOptions {
    /// Workflows to submit.
    pub runs: usize,
    /// Processes to kill (and restart) while runs are in flight.
    pub kills: usize,
    /// Seed of the kill schedule and the workflow mix; drawn at random when absent.
    pub seed: Option<u64>,
    /// The `multiplex` binary to start; the running executable when absent.
    pub binary: Option<PathBuf>,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub seed: u64,
    pub submitted: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Runs the daemon no longer knew after a restart.
    pub lost: usize,
    /// Runs still live when the soak stopped waiting.
    pub unfinished: usize,
    /// Kills done, by target (`daemon`, or a node name).
    pub kills: BTreeMap<String, usize>,
    /// `POST /prompt` requests the ComfyUI simulators saw, all instances together.
    pub prompts_received: u64,
    /// ComfyUI prompt ids one simulator instance was asked to run more than once.
    pub duplicate_prompts: Vec<String>,
    /// LangFlow sessions one simulator instance was asked to run more than once.
    pub duplicate_sessions: Vec<String>,
    /// First error of each failed run, for the report.
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

impl SoakReport {
    /// Nothing lost, no prompt run twice, nothing left hanging. Repeated LangFlow calls are
    /// the documented at-least-once case and do not count (see the module docs).
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.unfinished == 0 && self.duplicate_prompts.is_empty()
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kills: Vec<String> = self
            .kills
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        writeln!(f, "soak (seed {}), {:.1?}", self.seed, self.elapsed)?;
        writeln!(f, "  kills:               {}", kills.join(", "))?;
        writeln!(f, "  runs submitted:      {}", self.submitted)?;
        writeln!(f, "  runs completed:      {}", self.succeeded)?;
        writeln!(f, "  runs failed:         {}", self.failed)?;
        writeln!(f, "  runs lost:           {}", self.lost)?;
        writeln!(f, "  runs unfinished:     {}", self.unfinished)?;
        writeln!(f, "  prompts received:    {}", self.prompts_received)?;
        writeln!(f, "  prompts duplicated:  {}", self.duplicate_prompts.len())?;
        write!(
            f,
            "  flow calls repeated: {}",
            self.duplicate_sessions.len()
        )?;
        for failure in &self.failures {
            write!(f, "\n  failed: {failure}")?;
        }
        for id in &self.duplicate_prompts {
            write!(f, "\n  prompt duplicated: {id}")?;
        }
        for id in &self.duplicate_sessions {
            write!(f, "\n  flow call repeated: {id}")?;
        }
        Ok(())
    }
}

/// One submitted run as the soak tracks it.
struct Tracked {
    id: String,
    /// `succeeded`, `failed`, `cancelled`, `lost`, or `None` while live.
    outcome: Option<String>,
    error: Option<String>,
}

/// Runs the soak; an error means the soak itself could not go on (a process that would not
/// start again), not that the daemon misbehaved, which the report says.
pub async fn run(options: SoakOptions) -> anyhow::Result<SoakReport> {
    let started = Instant::now();
    let seed = options.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let binary = match options.binary.clone() {
        Some(path) => path,
        None => std::env::current_exe().context("cannot find the multiplex executable")?,
    };
    let workflows = load_workflows()?;

    let mut spec = ClusterSpec::standard(IMAGE_STEP_MS);
    spec.node_grace_ms = NODE_GRACE_MS;
    let mut harness = Harness::start(binary, spec).await?;
    let mut stats = SimTotals::default();
    let mut report = SoakReport {
        seed,
        ..SoakReport::default()
    };

    // Kill points: event counts (submissions plus runs ended) at which to kill.
    let events_total = options.runs * 2;
    let mut kill_points: Vec<usize> = (0..options.kills)
        .map(|_| rng.random_range(1..events_total.max(2)))
        .collect();
    kill_points.sort_unstable();
    kill_points.reverse();

    let bar = progress_bar(options.runs as u64);
    let mut runs: Vec<Tracked> = Vec::new();
    let patience_end = Duration::from_secs(60 + 5 * options.runs as u64);
    let mut deadline = Instant::now() + patience_end;
    loop {
        if runs.len() < options.runs {
            let workflow = &workflows[rng.random_range(0..workflows.len())];
            let id = harness
                .submit(workflow)
                .await
                .context("a submission to a running daemon failed")?;
            runs.push(Tracked {
                id,
                outcome: None,
                error: None,
            });
        }
        poll_runs(&harness, &mut runs).await;
        let ended = runs.iter().filter(|run| run.outcome.is_some()).count();
        bar.set_position(ended as u64);

        let events = runs.len() + ended;
        while kill_points.last().is_some_and(|point| *point <= events) {
            kill_points.pop();
            let target = kill_one(&mut harness, &mut rng, &mut stats).await?;
            *report.kills.entry(target.clone()).or_default() += 1;
            bar.set_message(format!("killed {target}"));
            // Time spent restarting is not the runs' time.
            deadline = Instant::now() + patience_end;
        }

        let all_ended = runs.len() == options.runs && ended == runs.len();
        if all_ended || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(TICK).await;
    }
    bar.finish_and_clear();

    for (name, sim_stats) in live_stats(&harness).await {
        stats.add(&name, &sim_stats);
    }
    report.submitted = runs.len();
    for run in &runs {
        match run.outcome.as_deref() {
            Some("succeeded") => report.succeeded += 1,
            Some("lost") => report.lost += 1,
            Some(_) => {
                report.failed += 1;
                let error = run.error.clone().unwrap_or_else(|| "no error".into());
                report.failures.push(format!("{}: {error}", run.id));
            }
            None => report.unfinished += 1,
        }
    }
    report.prompts_received = stats.prompts_received;
    report.duplicate_prompts = stats.duplicate_prompts;
    report.duplicate_sessions = stats.duplicate_sessions;
    report.elapsed = started.elapsed();
    if !report.clean() {
        harness.keep_files();
        eprintln!("logs of the soak's processes:\n{}", harness.logs());
        eprintln!("logs, config and data kept in {}", harness.dir().display());
    }
    Ok(report)
}

fn load_workflows() -> anyhow::Result<Vec<Value>> {
    WORKFLOWS
        .iter()
        .map(|name| {
            let text = config::embedded_text(name)?;
            serde_json::from_str(&text).with_context(|| format!("config/{name} is not JSON"))
        })
        .collect()
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style =
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} runs ended {msg}")
            .map(|style| style.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Fetches every live run; a 404 after the submission was answered is a lost run. Other
/// errors (the daemon restarting) leave the run as it was.
async fn poll_runs(harness: &Harness, runs: &mut [Tracked]) {
    for run in runs.iter_mut().filter(|run| run.outcome.is_none()) {
        match harness.run(&run.id).await {
            Ok(view) if crate::harness::run_ended(&view) => {
                run.outcome = view["state"].as_str().map(str::to_string);
                run.error = first_error(&view);
            }
            Ok(_) => {}
            Err(err) if format!("{err:#}").contains("404") => {
                run.outcome = Some("lost".into());
            }
            Err(_) => {}
        }
    }
}

/// The run's own error, else the first failed step's.
fn first_error(run: &Value) -> Option<String> {
    if let Some(message) = run["error"]["message"].as_str() {
        return Some(message.to_string());
    }
    let steps = run["steps"].as_array()?;
    steps
        .iter()
        .find(|step| step["state"] == "failed")
        .map(|step| format!("{}: {}", step["id"], step["error"]["message"]))
}

/// Kills the daemon or a simulator, waits a random moment, starts it again. Returns what
/// was killed.
async fn kill_one(
    harness: &mut Harness,
    rng: &mut StdRng,
    stats: &mut SimTotals,
) -> anyhow::Result<String> {
    let mut targets = vec!["daemon".to_string()];
    targets.extend(harness.comfy_names());
    targets.extend(harness.langflow_names());
    // Half the kills go to the daemon, the rest spread over the simulators.
    let target = if rng.random_bool(0.5) {
        targets[0].clone()
    } else {
        targets[rng.random_range(1..targets.len())].clone()
    };
    let downtime = Duration::from_millis(rng.random_range(0..MAX_DOWNTIME.as_millis() as u64));
    tracing::info!(target = %target, downtime = ?downtime, "soak: kill -9");
    if target == "daemon" {
        harness.kill_daemon().await?;
        tokio::time::sleep(downtime).await;
        harness.start_daemon().await?;
    } else {
        // Its counters die with it: read them first.
        if let Ok(sim_stats) = harness.sim_stats(&target).await {
            stats.add(&target, &sim_stats);
        }
        harness.kill_sim(&target).await?;
        tokio::time::sleep(downtime).await;
        harness.start_sim(&target).await?;
    }
    Ok(target)
}

/// Stats of every running simulator, by name.
async fn live_stats(harness: &Harness) -> Vec<(String, Value)> {
    let mut all = Vec::new();
    for name in harness
        .comfy_names()
        .into_iter()
        .chain(harness.langflow_names())
    {
        if let Ok(stats) = harness.sim_stats(&name).await {
            all.push((name, stats));
        }
    }
    all
}

/// Simulator counters summed over every instance that ever ran.
#[derive(Default)]
struct SimTotals {
    prompts_received: u64,
    duplicate_prompts: Vec<String>,
    duplicate_sessions: Vec<String>,
}

impl SimTotals {
    fn add(&mut self, name: &str, stats: &Value) {
        self.prompts_received += stats["prompts_received"].as_u64().unwrap_or(0);
        let ids = |key: &str| -> Vec<String> {
            stats[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|id| format!("{name}: {id}"))
                .collect()
        };
        self.duplicate_prompts.extend(ids("duplicate_prompts"));
        self.duplicate_sessions.extend(ids("duplicate_sessions"));
    }
}
