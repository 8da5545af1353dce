//! What a person watching a run sees: one line (or progress bar) per step.
//!
//! Split in two so the tricky half can be tested without a terminal:
//! - [`Tracker`] folds REST snapshots and WebSocket events into per-step state and reports
//!   only genuine transitions. Snapshots and events overlap (a snapshot is taken after the
//!   subscription, a replay after a reconnect repeats events), so it orders transitions by
//!   (attempt, stage) and drops anything that would move a step backwards.
//! - [`StepDisplay`] draws those transitions: indicatif bars on a terminal, or one plain line
//!   per transition when stderr is a file or a CI log, where indicatif would draw nothing.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use super::view;

/// How often a spinner advances while a step waits or runs.
const SPINNER_TICK: Duration = Duration::from_millis(120);

/// Bar layouts: a spinner while waiting, a bar once progress is known, a still line at the
/// end.
const WAITING: &str = "{spinner} {prefix} {wide_msg}";
const PROGRESSING: &str = "{spinner} {prefix} [{bar:30}] {pos}/{len} {wide_msg}";
const FINISHED: &str = "  {prefix} {wide_msg}";

/// A change worth showing, as decided by [`Tracker`].
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// The run moved to `state` (queued, running, succeeded, failed, cancelled).
    Run {
        state: String,
        error: Option<String>,
    },
    /// A step moved to a later stage or a new attempt.
    Step(StepChange),
    /// A running step reported progress (`value` out of `max`).
    Progress { step: String, value: f64, max: f64 },
    /// A free-form note from the daemon about a step ("loading Flux on box2").
    Notice { step: String, message: String },
}

/// A step's new state, with what the display needs to describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct StepChange {
    pub step: String,
    pub kind: Option<String>,
    pub state: String,
    pub node: Option<String>,
    pub attempt: u64,
    pub error: Option<String>,
    pub artifacts: Option<usize>,
}

/// The last transition seen for one step.
#[derive(Clone, Debug)]
struct StepSeen {
    attempt: u64,
    stage: u8,
    node: Option<String>,
}

/// Folds snapshots and events of one run into transitions; see the module doc.
#[derive(Debug)]
pub struct Tracker {
    run_id: String,
    run_state: Option<String>,
    steps: HashMap<String, StepSeen>,
}

/// Where a step state sits in a single attempt's life; later stages never go back.
fn stage(state: &str) -> u8 {
    match state {
        "pending" => 0,
        "queued" => 1,
        "assigned" => 2,
        "submitted" => 3,
        "running" => 4,
        "succeeded" | "failed" | "cancelled" | "skipped" => 5,
        // A state this CLI does not know yet: show it, but let any known later stage win.
        _ => 1,
    }
}

/// True for the run states after which nothing more happens.
pub fn run_ended(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

impl Tracker {
    pub fn new(run_id: &str) -> Tracker {
        Tracker {
            run_id: run_id.to_owned(),
            run_state: None,
            steps: HashMap::new(),
        }
    }

    /// True once the run reached a final state.
    pub fn ended(&self) -> bool {
        self.run_state.as_deref().is_some_and(run_ended)
    }

    /// Folds in a run view from REST.
    pub fn snapshot(&mut self, run: &Value) -> Vec<Change> {
        let mut changes = Vec::new();
        for step in view::list(run, "steps") {
            let Some(id) = view::text(step, "id") else {
                continue;
            };
            let state = view::text(step, "state").unwrap_or_else(|| "pending".to_owned());
            let attempt = view::count(step, "attempts").unwrap_or(0);
            let change = StepChange {
                step: id.clone(),
                kind: view::text(step, "kind"),
                node: view::text(step, "node"),
                attempt,
                error: view::error_message(step, "error"),
                artifacts: Some(view::list(step, "artifacts").len()),
                state,
            };
            let running = change.state == "running";
            self.step(change, &mut changes);
            if let (true, Some(p)) = (running, view::number(step, "progress")) {
                let value = (p.clamp(0.0, 1.0) * 100.0).round();
                changes.push(Change::Progress {
                    step: id,
                    value,
                    max: 100.0,
                });
            }
        }
        if let Some(state) = view::text(run, "state") {
            self.run(state, view::error_message(run, "error"), &mut changes);
        }
        changes
    }

    /// Folds in one activity event; events of other runs and of nodes are ignored.
    pub fn event(&mut self, event: &Value) -> Vec<Change> {
        let mut changes = Vec::new();
        if view::text(event, "run_id").as_deref() != Some(self.run_id.as_str()) {
            return changes;
        }
        let step = view::text(event, "step_id");
        match (view::text(event, "type").as_deref(), step) {
            (Some("run_state"), _) => {
                if let Some(state) = view::text(event, "state") {
                    self.run(state, view::error_message(event, "error"), &mut changes);
                }
            }
            (Some("step_state"), Some(step)) => {
                let Some(state) = view::text(event, "state") else {
                    return changes;
                };
                let artifacts = event
                    .get("artifacts")
                    .and_then(Value::as_array)
                    .map(Vec::len);
                let change = StepChange {
                    step,
                    kind: None,
                    node: view::text(event, "node"),
                    attempt: view::count(event, "attempt").unwrap_or(0),
                    error: view::error_message(event, "error"),
                    artifacts,
                    state,
                };
                self.step(change, &mut changes);
            }
            (Some("step_progress"), Some(step)) => self.progress(step, event, &mut changes),
            (Some("step_notice"), Some(step)) => {
                if let Some(message) = view::text(event, "message") {
                    changes.push(Change::Notice { step, message });
                }
            }
            // run_submitted, step_preview and anything newer: nothing to draw.
            _ => {}
        }
        changes
    }

    fn run(&mut self, state: String, error: Option<String>, changes: &mut Vec<Change>) {
        if self.ended() || self.run_state.as_deref() == Some(state.as_str()) {
            return;
        }
        self.run_state = Some(state.clone());
        changes.push(Change::Run { state, error });
    }

    /// Records a step transition if it moves the step forward.
    fn step(&mut self, mut change: StepChange, changes: &mut Vec<Change>) {
        let stage = stage(&change.state);
        // Attempts count from 1 once a step left `pending`; the daemon may report 0 for a
        // step that is queued but not yet tried, which is the same first attempt.
        if stage > 0 {
            change.attempt = change.attempt.max(1);
        }
        if let Some(seen) = self.steps.get(&change.step) {
            if (change.attempt, stage) <= (seen.attempt, seen.stage) {
                return;
            }
            if change.node.is_none() && change.attempt == seen.attempt {
                change.node = seen.node.clone();
            }
        }
        let seen = StepSeen {
            attempt: change.attempt,
            stage,
            node: change.node.clone(),
        };
        self.steps.insert(change.step.clone(), seen);
        changes.push(Change::Step(change));
    }

    /// Progress implies the step runs; a tick that overtakes its `running` transition (or
    /// arrives after a missed one) reports that transition first.
    fn progress(&mut self, step: String, event: &Value, changes: &mut Vec<Change>) {
        let (Some(value), Some(max)) = (view::number(event, "value"), view::number(event, "max"))
        else {
            return;
        };
        let seen = self.steps.get(&step).cloned();
        if seen.as_ref().is_some_and(|s| s.stage >= stage("succeeded")) {
            return;
        }
        if seen.as_ref().is_none_or(|s| s.stage < stage("running")) {
            let change = StepChange {
                step: step.clone(),
                kind: None,
                state: "running".to_owned(),
                node: view::text(event, "node"),
                attempt: seen.map_or(1, |s| s.attempt),
                error: None,
                artifacts: None,
            };
            self.step(change, changes);
        }
        changes.push(Change::Progress { step, value, max });
    }
}

/// How [`StepDisplay`] draws.
enum Mode {
    /// Live bars on a terminal.
    Bars(MultiProgress),
    /// One line per transition, for logs; `quarters` remembers the last 25% mark printed per
    /// step so a long step still shows signs of life without a line per tick.
    Plain {
        out: Box<dyn Write>,
        quarters: HashMap<String, u8>,
    },
}

/// Draws [`Change`]s for people, on stderr by default.
pub struct StepDisplay {
    mode: Mode,
    bars: HashMap<String, ProgressBar>,
    kinds: HashMap<String, String>,
    /// Width step ids are padded to so bars line up; grows as longer ids appear.
    width: usize,
}

impl StepDisplay {
    /// Bars when stderr is a terminal, plain lines on stderr otherwise.
    pub fn stderr() -> StepDisplay {
        if std::io::stderr().is_terminal() {
            StepDisplay::bars(ProgressDrawTarget::stderr())
        } else {
            StepDisplay::plain(Box::new(std::io::stderr()))
        }
    }

    /// Live bars drawn to `target`.
    pub fn bars(target: ProgressDrawTarget) -> StepDisplay {
        StepDisplay::with_mode(Mode::Bars(MultiProgress::with_draw_target(target)))
    }

    /// Plain lines to `out`; used for logs and by tests.
    pub fn plain(out: Box<dyn Write>) -> StepDisplay {
        StepDisplay::with_mode(Mode::Plain {
            out,
            quarters: HashMap::new(),
        })
    }

    fn with_mode(mode: Mode) -> StepDisplay {
        StepDisplay {
            mode,
            bars: HashMap::new(),
            kinds: HashMap::new(),
            width: 0,
        }
    }

    /// Draws a batch of changes from one snapshot or event.
    pub fn show(&mut self, changes: &[Change]) {
        for change in changes {
            if let Change::Step(StepChange {
                step,
                kind: Some(kind),
                ..
            }) = change
            {
                self.kinds.insert(step.clone(), kind.clone());
            }
            match change {
                Change::Run { state, error } => {
                    let mut line = format!("run {state}");
                    if let Some(error) = error {
                        line.push_str(&format!(": {error}"));
                    }
                    self.line(&line);
                }
                Change::Step(change) => self.step(change),
                Change::Progress { step, value, max } => self.progress(step, *value, *max),
                Change::Notice { step, message } => {
                    let line = format!("{}: {message}", self.label(step));
                    self.line(&line);
                }
            }
        }
    }

    /// Leaves every bar drawn in its last state; call once the run ended.
    pub fn finish(&mut self) {
        for bar in self.bars.values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
        if let Mode::Plain { out, .. } = &mut self.mode {
            let _ = out.flush();
        }
    }

    /// "still (image)" once the kind is known, else just the id.
    fn label(&self, step: &str) -> String {
        match self.kinds.get(step) {
            Some(kind) => format!("{step} ({kind})"),
            None => step.to_owned(),
        }
    }

    /// Writes one line above the bars, or to the plain output.
    fn line(&mut self, line: &str) {
        match &mut self.mode {
            Mode::Bars(multi) => {
                let _ = multi.println(line);
            }
            Mode::Plain { out, .. } => {
                // Progress lines are best effort: a closed stderr must not stop the follow.
                let _ = writeln!(out, "{line}");
            }
        }
    }

    fn step(&mut self, change: &StepChange) {
        let text = describe(change);
        let finished = stage(&change.state) >= stage("succeeded");
        if let Mode::Plain { quarters, .. } = &mut self.mode {
            if change.state == "pending" {
                return;
            }
            if change.state == "queued" {
                quarters.remove(&change.step);
            }
            let line = format!("{}: {text}", self.label(&change.step));
            self.line(&line);
            return;
        }

        let bar = self.bar(&change.step);
        if finished {
            bar.set_style(style(FINISHED));
            bar.disable_steady_tick();
            if change.state == "succeeded" {
                bar.finish_with_message(text);
            } else {
                bar.abandon_with_message(text);
            }
        } else {
            // A retry after a failure starts over: fresh position, spinner again.
            if change.state == "queued" {
                bar.reset();
            }
            bar.set_style(style(WAITING));
            bar.enable_steady_tick(SPINNER_TICK);
            bar.set_message(text);
        }
    }

    fn progress(&mut self, step: &str, value: f64, max: f64) {
        if !(value.is_finite() && max.is_finite() && max > 0.0) {
            return;
        }
        let label = self.label(step);
        if let Mode::Plain { out, quarters } = &mut self.mode {
            let quarter = ((value / max).clamp(0.0, 1.0) * 4.0).floor() as u8;
            let last = quarters.entry(step.to_owned()).or_insert(0);
            if quarter > *last && quarter < 4 {
                *last = quarter;
                let _ = writeln!(out, "{label}: {}% ({value}/{max})", u32::from(quarter) * 25);
            }
            return;
        }

        let bar = self.bar(step);
        bar.set_style(style(PROGRESSING));
        bar.set_length(max.round() as u64);
        bar.set_position(value.clamp(0.0, max).round() as u64);
    }

    /// The bar for a step, created (below the others) on first sight.
    fn bar(&mut self, step: &str) -> ProgressBar {
        if let Some(bar) = self.bars.get(step) {
            return bar.clone();
        }
        let Mode::Bars(multi) = &self.mode else {
            return ProgressBar::hidden();
        };
        let bar = multi.add(ProgressBar::new(0));
        self.bars.insert(step.to_owned(), bar.clone());
        let len = self.label(step).chars().count();
        if len > self.width {
            // Re-pad every bar so the columns stay aligned as longer names appear.
            self.width = len;
            for (step, bar) in &self.bars {
                bar.set_prefix(format!("{:<width$}", self.label(step), width = self.width));
            }
        } else {
            bar.set_prefix(format!("{:<width$}", self.label(step), width = self.width));
        }
        bar
    }
}

/// The words for a step transition: "queued", "placed on box2", "failed: out of memory".
fn describe(change: &StepChange) -> String {
    let node = change.node.as_deref().unwrap_or("a node");
    let mut text = match change.state.as_str() {
        "pending" => "waiting for inputs".to_owned(),
        "queued" => "queued".to_owned(),
        "assigned" => format!("placed on {node}"),
        "submitted" => format!("sent to {node}"),
        "running" => format!("running on {node}"),
        "succeeded" => match change.artifacts {
            Some(1) => "done, 1 artifact".to_owned(),
            Some(n) if n > 1 => format!("done, {n} artifacts"),
            _ => "done".to_owned(),
        },
        "failed" => match &change.error {
            Some(error) => format!("failed: {error}"),
            None => "failed".to_owned(),
        },
        other => other.to_owned(),
    };
    if change.attempt > 1 && stage(&change.state) < stage("succeeded") {
        text.push_str(&format!(" (attempt {})", change.attempt));
    }
    text
}

/// A bar style from a template that is known to be valid.
fn style(template: &str) -> ProgressStyle {
    // The templates are literals in this file; should one be wrong, plain text still works.
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step_states(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Step(s) => Some(format!("{}:{}#{}", s.step, s.state, s.attempt)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn stale_events_after_a_snapshot_do_not_move_steps_backwards() {
        let mut tracker = Tracker::new("r1");
        let snapshot = json!({"state": "running", "steps": [
            {"id": "a", "kind": "image", "state": "succeeded", "attempts": 1},
            {"id": "b", "kind": "video", "state": "queued", "attempts": 0},
        ]});
        let first = tracker.snapshot(&snapshot);
        assert_eq!(step_states(&first), ["a:succeeded#1", "b:queued#1"]);

        let stale = json!({"type": "step_state", "run_id": "r1", "step_id": "a",
                           "state": "running", "attempt": 1});
        assert!(tracker.event(&stale).is_empty());
        let dup = json!({"type": "step_state", "run_id": "r1", "step_id": "b",
                         "state": "queued", "attempt": 1});
        assert!(tracker.event(&dup).is_empty());

        let other_run = json!({"type": "step_state", "run_id": "r2", "step_id": "b",
                               "state": "running", "attempt": 1});
        assert!(tracker.event(&other_run).is_empty());
    }

    #[test]
    fn a_retry_is_a_new_attempt_and_progress_implies_running() {
        let mut tracker = Tracker::new("r1");
        let failed = json!({"type": "step_state", "run_id": "r1", "step_id": "v",
                            "state": "failed", "attempt": 1, "error": {"message": "oom"}});
        assert_eq!(step_states(&tracker.event(&failed)), ["v:failed#1"]);
        let retry = json!({"type": "step_state", "run_id": "r1", "step_id": "v",
                           "state": "queued", "attempt": 2});
        assert_eq!(step_states(&tracker.event(&retry)), ["v:queued#2"]);
        let tick = json!({"type": "step_progress", "run_id": "r1", "step_id": "v",
                          "node": "box1", "value": 3, "max": 10});
        let changes = tracker.event(&tick);
        assert_eq!(step_states(&changes), ["v:running#2"]);
        assert!(matches!(changes.last(), Some(Change::Progress { value, .. }) if *value == 3.0));
    }

    #[test]
    fn bars_take_every_kind_of_change() {
        for template in [WAITING, PROGRESSING, FINISHED] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
        let mut display = StepDisplay::bars(ProgressDrawTarget::hidden());
        let mut tracker = Tracker::new("r1");
        let mut show = |event: Value| display.show(&tracker.event(&event));
        let step = |state: &str, attempt: u64| {
            json!({"type": "step_state", "run_id": "r1", "step_id": "v", "state": state,
                   "node": "box1", "attempt": attempt, "error": {"message": "oom"}})
        };
        show(step("queued", 1));
        show(
            json!({"type": "step_progress", "run_id": "r1", "step_id": "v", "value": 5,
                    "max": 0}),
        );
        show(
            json!({"type": "step_progress", "run_id": "r1", "step_id": "v", "value": 5,
                    "max": 10}),
        );
        show(step("failed", 1));
        show(step("queued", 2));
        show(json!({"type": "step_notice", "run_id": "r1", "step_id": "v", "message": "hi"}));
        show(step("succeeded", 2));
        show(json!({"type": "run_state", "run_id": "r1", "state": "succeeded"}));
        display.finish();
    }

    #[test]
    fn run_end_is_final() {
        let mut tracker = Tracker::new("r1");
        let done = json!({"type": "run_state", "run_id": "r1", "state": "succeeded"});
        assert_eq!(tracker.event(&done).len(), 1);
        assert!(tracker.ended());
        let late = json!({"type": "run_state", "run_id": "r1", "state": "running"});
        assert!(tracker.event(&late).is_empty());
    }
}
