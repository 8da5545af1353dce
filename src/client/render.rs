//! Tables and summaries for people, printed on stdout.
//!
//! These are the CLI's output proper (what `multiplex status` or `multiplex nodes` is run
//! for), so they go to stdout where they can be piped, while logs and progress go to stderr.
//! Each printer has a pure twin that returns the text, which the tests read. Every value is
//! read through `view`, so a field the daemon left out shows as "-".

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use comfy_table::{presets, ContentArrangement, Table};
use serde_json::Value;
use url::Url;

use super::view::{self, MISSING};

/// Widest an error is allowed to be in a table cell; the summary shows it whole.
const ERROR_CELL_CHARS: usize = 60;

/// Most lines of an error's `details` (a ComfyUI traceback, say) the summary shows.
const DETAIL_LINES: usize = 20;

/// Prints the runs of `GET /api/workflows` (`{"runs": [...]}` or a bare array), newest first.
pub fn print_runs_table(runs: &Value) {
    emit(&runs_table(runs));
}

/// Prints one run as a header and a table of its steps (`multiplex status RUN`).
pub fn print_run_table(run: &Value) {
    emit(&run_table(run));
}

/// Prints the nodes of `GET /api/nodes` (`{"nodes": [...]}` or a bare array).
pub fn print_nodes_table(nodes: &Value) {
    emit(&nodes_table(nodes));
}

pub fn print_tunnels_table(tunnels: &Value) {
    emit(&tunnels_table(tunnels));
}

/// Prints a finished run: its state, each step's node, timings and error, and every artifact
/// with its URL under `base` (when given) plus, when `data_dir` is given, where the daemon
/// stores the file (`data_dir/artifacts/<first 2 chars of id>/<id>`), for a CLI on the
/// daemon's machine.
pub fn print_run_summary(run: &Value, base: Option<&Url>, data_dir: Option<&Path>) {
    emit(&run_summary(run, base, data_dir));
}

/// Writes the CLI's output to stdout. `println!` is avoided on purpose: it panics when stdout
/// is a closed pipe (`multiplex status | head -1`), and a closed pipe is normal here.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let result = writeln!(out, "{text}").and_then(|()| out.flush());
    if let Err(err) = result {
        if err.kind() != std::io::ErrorKind::BrokenPipe {
            tracing::warn!(error = %err, "cannot write to stdout");
        }
    }
}

/// A table with the house style: condensed borders, columns that shrink to the terminal.
fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    table
}

/// The items of a list answer, whether wrapped in `{key: [...]}` or bare.
fn items<'a>(answer: &'a Value, key: &str) -> &'a [Value] {
    match answer {
        Value::Array(items) => items,
        _ => view::list(answer, key),
    }
}

pub(crate) fn runs_table(runs: &Value) -> String {
    let runs = items(runs, "runs");
    if runs.is_empty() {
        return "no runs".to_owned();
    }
    let mut table = new_table(&["RUN", "NAME", "STATE", "STEPS", "CREATED", "TOOK", "ERROR"]);
    for run in runs {
        table.add_row(vec![
            view::cell(run, "id"),
            view::cell(run, "name"),
            view::cell(run, "state"),
            steps_done(run),
            view::timestamp(run, "created_at"),
            took(run, "created_at"),
            error_cell(run),
        ]);
    }
    table.to_string()
}

pub(crate) fn run_table(run: &Value) -> String {
    let mut out = run_header(run);
    let steps = view::list(run, "steps");
    if steps.is_empty() {
        out.push_str("\nno steps");
        return out;
    }

    let mut table = new_table(&[
        "STEP", "KIND", "STATE", "NODE", "TRIES", "PROGRESS", "WAITED", "RAN", "OUTPUTS", "ERROR",
    ]);
    for step in steps {
        table.add_row(vec![
            view::cell(step, "id"),
            view::cell(step, "kind"),
            view::cell(step, "state"),
            view::cell(step, "node"),
            view::cell(step, "attempts"),
            progress_cell(step),
            seconds_cell(step, "queued_at", "started_at"),
            seconds_cell(step, "started_at", "finished_at"),
            artifact_kinds(step),
            error_cell(step),
        ]);
    }
    let _ = write!(out, "\n{table}");
    out
}

pub(crate) fn tunnels_table(tunnels: &Value) -> String {
    let tunnels = items(tunnels, "tunnels");
    if tunnels.is_empty() {
        return "no tunnels configured".to_owned();
    }
    let mut table = new_table(&[
        "NODE",
        "TARGET",
        "STATE",
        "SINCE",
        "RECONNECTS",
        "CHANNELS",
        "SENT",
        "RECEIVED",
        "FORWARDS",
        "LAST ERROR",
    ]);
    for tunnel in tunnels {
        let forwards: Vec<String> = view::list(tunnel, "forwards")
            .iter()
            .map(|f| {
                format!(
                    "{} {} -> {}",
                    view::cell(f, "name"),
                    view::cell(f, "local"),
                    view::cell(f, "remote")
                )
            })
            .collect();
        let bytes = |key| view::count(tunnel, key).map_or(MISSING.to_owned(), view::size);
        let channels = match (
            view::count(tunnel, "open_channels"),
            view::count(tunnel, "channel_failures"),
        ) {
            (Some(open), Some(0) | None) => format!("{open} open"),
            (Some(open), Some(failed)) => format!("{open} open, {failed} failed"),
            _ => MISSING.to_owned(),
        };
        let error = view::text(tunnel, "last_error")
            .map_or(MISSING.to_owned(), |e| view::truncate(&e, ERROR_CELL_CHARS));
        table.add_row(vec![
            view::cell(tunnel, "node"),
            view::cell(tunnel, "target"),
            view::cell(tunnel, "state"),
            view::timestamp(tunnel, "since"),
            view::cell(tunnel, "reconnects"),
            channels,
            bytes("bytes_sent"),
            bytes("bytes_received"),
            forwards.join("\n"),
            error,
        ]);
    }
    table.to_string()
}

pub(crate) fn nodes_table(nodes: &Value) -> String {
    let nodes = items(nodes, "nodes");
    if nodes.is_empty() {
        return "no nodes configured".to_owned();
    }
    let mut table = new_table(&[
        "NODE",
        "OS",
        "STATUS",
        "SLOTS",
        "RUNNING",
        "SERVICES",
        "GPUS",
        "VRAM",
        "RECENT MODELS",
    ]);
    for node in nodes {
        let status = match node.get("available").and_then(Value::as_bool) {
            Some(true) => "available".to_owned(),
            Some(false) => match view::text(node, "reason") {
                Some(reason) => format!("down: {}", view::truncate(&reason, ERROR_CELL_CHARS)),
                None => "down".to_owned(),
            },
            None => MISSING.to_owned(),
        };
        let slots = match (view::count(node, "free_slots"), view::count(node, "slots")) {
            (Some(free), Some(total)) => format!("{free}/{total} free"),
            (None, Some(total)) => total.to_string(),
            _ => MISSING.to_owned(),
        };
        let running = match view::list(node, "running").len() {
            0 => MISSING.to_owned(),
            _ => view::joined(node, "running"),
        };
        let vram = match view::count(node, "vram_mb") {
            Some(mb) => view::size(mb.saturating_mul(1024 * 1024)),
            None => MISSING.to_owned(),
        };
        table.add_row(vec![
            view::cell(node, "name"),
            view::cell(node, "os"),
            status,
            slots,
            running,
            view::joined(node, "services"),
            view::joined(node, "gpus"),
            vram,
            view::joined(node, "recent_models"),
        ]);
    }
    table.to_string()
}

pub(crate) fn run_summary(run: &Value, base: Option<&Url>, data_dir: Option<&Path>) -> String {
    let mut out = run_header(run);

    for step in view::list(run, "steps") {
        let _ = write!(
            out,
            "\n  {} ({}): {}",
            view::cell(step, "id"),
            view::cell(step, "kind"),
            view::cell(step, "state")
        );
        if let Some(node) = view::text(step, "node") {
            let _ = write!(out, " on {node}");
        }
        let mut timings = Vec::new();
        if let Some(waited) = view::seconds_between(step, "queued_at", "started_at") {
            timings.push(format!("waited {}", view::duration(waited)));
        }
        if let Some(ran) = view::seconds_between(step, "started_at", "finished_at") {
            timings.push(format!("ran {}", view::duration(ran)));
        }
        if let Some(attempts) = view::count(step, "attempts").filter(|n| *n > 1) {
            timings.push(format!("{attempts} attempts"));
        }
        if !timings.is_empty() {
            let _ = write!(out, ", {}", timings.join(", "));
        }
        write_error(&mut out, step);

        for artifact in view::list(step, "artifacts") {
            write_artifact(&mut out, artifact, base, data_dir);
        }
    }
    out
}

/// `run ID "name": state, took 2m 05s` plus the run's error, shared by status and summary.
fn run_header(run: &Value) -> String {
    let mut out = format!("run {}", view::cell(run, "id"));
    if let Some(name) = view::text(run, "name") {
        let _ = write!(out, " {name:?}");
    }
    let _ = write!(out, ": {}", view::cell(run, "state"));
    if let Some(secs) = view::seconds_between(run, "created_at", "finished_at") {
        let _ = write!(out, ", took {}", view::duration(secs));
    }
    let _ = write!(out, " (created {})", view::timestamp(run, "created_at"));
    if let Some(error) = view::error_message(run, "error") {
        let _ = write!(out, "\n  error: {error}");
    }
    out
}

/// The error of a step in the summary: its message, then its details indented and capped.
fn write_error(out: &mut String, step: &Value) {
    let Some(message) = view::error_message(step, "error") else {
        return;
    };
    let _ = write!(out, "\n      error: {message}");
    let details = match step.get("error").and_then(|e| e.get("details")) {
        None | Some(Value::Null) => return,
        Some(Value::String(s)) => s.clone(),
        Some(other) => serde_json::to_string_pretty(other).unwrap_or_default(),
    };
    let lines: Vec<&str> = details.lines().filter(|l| !l.trim().is_empty()).collect();
    for line in lines.iter().take(DETAIL_LINES) {
        let _ = write!(out, "\n        {}", view::printable(line));
    }
    if lines.len() > DETAIL_LINES {
        let _ = write!(out, "\n        … {} more lines", lines.len() - DETAIL_LINES);
    }
}

/// One artifact: what it is, then its URL and local path on their own lines for copying.
fn write_artifact(out: &mut String, artifact: &Value, base: Option<&Url>, data_dir: Option<&Path>) {
    let size = view::count(artifact, "size")
        .map(view::size)
        .unwrap_or_else(|| MISSING.into());
    let _ = write!(
        out,
        "\n      {} {} {} ({size})",
        view::cell(artifact, "kind"),
        view::cell(artifact, "filename"),
        view::cell(artifact, "mime"),
    );
    let url = base.and_then(|base| {
        let link = view::text(artifact, "url");
        let link = link.or_else(|| Some(format!("api/artifacts/{}", view::text(artifact, "id")?)));
        base.join(&link?).ok()
    });
    if let Some(url) = url {
        let _ = write!(out, "\n        {url}");
    }
    if let Some(path) = data_dir.and_then(|dir| artifact_path(dir, artifact)) {
        let _ = write!(out, "\n        {}", path.display());
    }
}

/// Where the daemon keeps an artifact's file. Only plain alphanumeric ids (the store's
/// content hashes) are turned into a path, so an odd id can never point outside `data_dir`.
pub(crate) fn artifact_path(data_dir: &Path, artifact: &Value) -> Option<PathBuf> {
    let id = view::text(artifact, "id")?;
    if id.len() < 3 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(data_dir.join("artifacts").join(&id[..2]).join(&id))
}

/// "3/5" steps succeeded out of the total.
fn steps_done(run: &Value) -> String {
    let steps = view::list(run, "steps");
    if steps.is_empty() {
        return MISSING.to_owned();
    }
    let done = steps
        .iter()
        .filter(|s| s.get("state").and_then(Value::as_str) == Some("succeeded"));
    format!("{}/{}", done.count(), steps.len())
}

/// How long a run took, from `from` to `finished_at`.
fn took(value: &Value, from: &str) -> String {
    view::seconds_between(value, from, "finished_at")
        .map(view::duration)
        .unwrap_or_else(|| MISSING.to_owned())
}

fn seconds_cell(value: &Value, from: &str, to: &str) -> String {
    view::seconds_between(value, from, to)
        .map(view::duration)
        .unwrap_or_else(|| MISSING.into())
}

fn progress_cell(step: &Value) -> String {
    match view::number(step, "progress") {
        Some(p) if p.is_finite() => format!("{:.0}%", (p.clamp(0.0, 1.0)) * 100.0),
        _ => MISSING.to_owned(),
    }
}

fn error_cell(value: &Value) -> String {
    view::error_message(value, "error")
        .map(|e| view::truncate(e.lines().next().unwrap_or_default(), ERROR_CELL_CHARS))
        .unwrap_or_else(|| MISSING.to_owned())
}

/// "image ×2, text" for a step's artifacts.
fn artifact_kinds(step: &Value) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for artifact in view::list(step, "artifacts") {
        let kind = view::cell(artifact, "kind");
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    if kinds.is_empty() {
        return MISSING.to_owned();
    }
    let parts: Vec<String> = kinds
        .into_iter()
        .map(|(kind, n)| {
            if n == 1 {
                kind
            } else {
                format!("{kind} ×{n}")
            }
        })
        .collect();
    parts.join(", ")
}
