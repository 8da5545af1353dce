//! The `WorkflowRun` actor: one per submitted workflow.
//!
//! It owns the run's plan and its durable record. It starts every step whose inputs exist,
//! doing daemon-side steps (an intent's text, an output's collection) itself and handing
//! remote ones to the scheduler as tasks; it records each transition in the store before
//! acting on it, relays progress to the activity stream, and ends the run when every step
//! has ended. Independent branches run at the same time because every ready step is handed
//! out at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use time::OffsetDateTime;
use tracing::{debug, error, info, warn};

use crate::activity::{Activity, ActivityHub, Publish};
use crate::artifact::{ArtifactKind, ArtifactMeta};
use crate::scheduler::{CancelRun, Enqueue, PlacedPrompt, Scheduler};
use crate::store::{RemoteRef, RunRecord, RunState, StepError, StepRecord, StepState, Store};
use crate::task::{
    ConfirmPlacement, RecordServerId, RemoteJob, Task, TaskEvent, TaskFailure, TaskKey, TaskUpdate,
};
use crate::workflow::{Catalog, InputArtifact, Job, Plan, Service};

/// Largest text artifact read into memory to feed a downstream step's prompt.
const MAX_TEXT_INPUT: u64 = 1024 * 1024;
/// First pause before a failed store write is tried again; it doubles up to the maximum.
const STORE_RETRY_FIRST: Duration = Duration::from_millis(100);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// The live runs, by id. A run removes itself once it has ended, so the registry holds only
/// runs that can still change (and cancel or live status can reach them).
#[derive(Clone, Default)]
pub struct RunRegistry {
    runs: Arc<Mutex<HashMap<String, Addr<WorkflowRun>>>>,
}

impl RunRegistry {
    pub fn get(&self, id: &str) -> Option<Addr<WorkflowRun>> {
        self.lock().get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, id: String, addr: Addr<WorkflowRun>) {
        self.lock().insert(id, addr);
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Addr<WorkflowRun>>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.runs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What every run needs from the daemon.
#[derive(Clone)]
pub struct RunServices {
    pub store: Store,
    pub catalog: Arc<Catalog>,
    pub scheduler: Addr<Scheduler>,
    pub hub: Addr<ActivityHub>,
    pub registry: RunRegistry,
}

/// Cancel the run: queued tasks are dropped, running ones interrupted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelWorkflow;

/// The run's live record, progress included.
#[derive(Message)]
#[rtype(result = "RunRecord")]
pub struct Snapshot;

/// A daemon-side step finished its work (or a remote step was rendered).
#[derive(Message)]
#[rtype(result = "()")]
struct StepPrepared {
    step_id: String,
    mode: Dispatch,
    outcome: Result<Prepared, StepError>,
}

/// How a rendered remote step goes to the scheduler.
#[derive(Debug, Clone)]
enum Dispatch {
    /// A new attempt: a new remote id, any capable node.
    Fresh,
    /// Work that may already be on `node` (found in flight after a restart): same attempt,
    /// same remote id, pinned to that node, which looks it up before sending anything.
    Resume { node: String },
}

/// Constraints of a new attempt.
#[derive(Debug, Clone, Default)]
struct AttemptOptions {
    avoid_nodes: Vec<String>,
    more_vram_than: Option<String>,
    /// Keep the remote id and look the work up on this node first: after a failure whose
    /// outcome is unknown (a dropped connection while posting, a node that went away), the
    /// service may have the work already.
    check_first_on: Option<String>,
}

enum Prepared {
    /// Done in the daemon; these are the step's artifacts.
    Done(Vec<ArtifactMeta>),
    /// To be run by a node.
    Remote(RemoteJob),
}

/// One workflow run.
pub struct WorkflowRun {
    record: RunRecord,
    plan: Arc<Plan>,
    services: RunServices,
    /// Rendered jobs by step, kept so a retry does not render again.
    pending_jobs: HashMap<String, RemoteJob>,
    /// Steps whose out-of-memory retry on another node has been used.
    oom_retried: std::collections::HashSet<String>,
    /// Failed attempts per step that count against its retry policy.
    charged_attempts: HashMap<String, u32>,
    /// Set for a run read back from the store: its steps in flight are resumed on start.
    resuming: bool,
    /// The lease the run was submitted under, copied onto every task. Leases are not
    /// stored, so a resumed run has none.
    lease: Option<String>,
}

impl WorkflowRun {
    /// Starts a run whose record is already in the store, under supervision; with a lease,
    /// every step is restricted to the lease's nodes.
    pub fn start(
        record: RunRecord,
        plan: Plan,
        services: RunServices,
        lease: Option<String>,
    ) -> Addr<WorkflowRun> {
        Self::spawn(record, plan, services, false, lease)
    }

    /// Starts a run found unfinished in the store after a restart: work that was in flight
    /// is looked up on its node rather than sent again.
    pub fn resume(record: RunRecord, plan: Plan, services: RunServices) -> Addr<WorkflowRun> {
        Self::spawn(record, plan, services, true, None)
    }

    fn spawn(
        record: RunRecord,
        plan: Plan,
        services: RunServices,
        resuming: bool,
        lease: Option<String>,
    ) -> Addr<WorkflowRun> {
        let id = record.id.clone();
        let registry = services.registry.clone();
        let plan = Arc::new(plan);
        let addr = Supervisor::start(move |_ctx| WorkflowRun {
            record,
            plan,
            services,
            pending_jobs: HashMap::new(),
            oom_retried: Default::default(),
            charged_attempts: HashMap::new(),
            resuming,
            lease,
        });
        registry.insert(id, addr.clone());
        addr
    }

    /// A fresh record for a planned document: every step pending.
    pub fn new_record(id: String, plan: &Plan, document: serde_json::Value) -> RunRecord {
        RunRecord {
            id,
            name: plan.name().to_string(),
            state: RunState::Queued,
            created_at: OffsetDateTime::now_utc(),
            finished_at: None,
            error: None,
            document,
            steps: plan
                .steps()
                .iter()
                .map(|step| StepRecord::new(&step.id, step.kind.as_str()))
                .collect(),
        }
    }

    fn publish(&self, activity: Activity) {
        self.services.hub.do_send(Publish(activity));
    }

    fn publish_step(&self, step: &StepRecord) {
        self.publish(Activity::StepState {
            run_id: self.record.id.clone(),
            step_id: step.id.clone(),
            state: step.state,
            node: step.node.clone(),
            attempt: step.attempts,
            error: step.error.clone(),
            artifacts: step.artifacts.clone(),
        });
    }

    /// Writes the record, waits until it is durable, then continues with `then`. The
    /// mailbox waits too (`ctx.wait`), so no later transition can overtake this one.
    ///
    /// A write that fails (a full disk, an I/O error) is tried again, with backoff, until it
    /// succeeds: until then the run neither acknowledges nor sends anything, since what it
    /// would act on is not durable.
    fn persist_then<F>(&mut self, ctx: &mut Context<Self>, then: F)
    where
        F: FnOnce(&mut Self, &mut Context<Self>) + 'static,
    {
        self.persist_attempt(ctx, STORE_RETRY_FIRST, then);
    }

    fn persist_attempt<F>(&mut self, ctx: &mut Context<Self>, backoff: Duration, then: F)
    where
        F: FnOnce(&mut Self, &mut Context<Self>) + 'static,
    {
        let store = self.services.store.clone();
        let record = self.record.clone();
        let save = async move { store.save_run(&record).await };
        ctx.wait(
            save.into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(()) => then(act, ctx),
                    Err(err) => {
                        error!(run_id = %act.record.id, error = %err, retry_in = ?backoff,
                    "could not persist run; holding it until the store takes the write");
                        let pause = actix::clock::sleep(backoff).into_actor(act);
                        ctx.wait(pause.map(move |(), act, ctx| {
                            let next = (backoff * 2).min(STORE_RETRY_MAX);
                            act.persist_attempt(ctx, next, then);
                        }));
                    }
                }),
        );
    }

    /// Starts every pending step whose dependencies all succeeded, skips those behind a
    /// failure, and ends the run when nothing is left.
    fn advance(&mut self, ctx: &mut Context<Self>) {
        if self.record.state.is_terminal() {
            return;
        }
        let mut changed = false;
        let mut ready = Vec::new();
        for planned in self.plan.steps() {
            let Some(step) = self.record.step(&planned.id) else {
                continue;
            };
            if step.state != StepState::Pending {
                continue;
            }
            let deps: Vec<StepState> = self
                .plan
                .dependencies(&planned.id)
                .iter()
                .filter_map(|dep| self.record.step(dep).map(|s| s.state))
                .collect();
            if deps
                .iter()
                .any(|s| s.is_terminal() && *s != StepState::Succeeded)
            {
                if let Some(step) = self.record.step_mut(&planned.id) {
                    step.state = StepState::Skipped;
                    step.finished_at = Some(OffsetDateTime::now_utc());
                }
                changed = true;
            } else if deps.iter().all(|s| *s == StepState::Succeeded) {
                ready.push(planned.id.clone());
            }
        }
        if self.record.state == RunState::Queued && !ready.is_empty() {
            self.record.state = RunState::Running;
            self.publish(Activity::RunState {
                run_id: self.record.id.clone(),
                state: RunState::Running,
                error: None,
            });
            changed = true;
        }
        for step_id in &ready {
            self.prepare_step(step_id, Dispatch::Fresh, ctx);
        }
        if changed {
            for step in self
                .record
                .steps
                .iter()
                .filter(|s| s.state == StepState::Skipped)
            {
                self.publish_step(step);
            }
        }
        if self
            .record
            .steps
            .iter()
            .all(|step| step.state.is_terminal())
        {
            self.finish_run(ctx);
        } else if changed {
            self.persist_then(ctx, |_, _| {});
        }
    }

    /// Renders a step (reading its inputs) off the mailbox. A fresh step is marked queued
    /// first; a resumed one keeps the state it was found in.
    fn prepare_step(&mut self, step_id: &str, mode: Dispatch, ctx: &mut Context<Self>) {
        let inputs = match self.input_artifacts(step_id) {
            Ok(inputs) => inputs,
            Err(error) => {
                self.fail_step(step_id, error, ctx);
                return;
            }
        };
        if let (Dispatch::Fresh, Some(step)) = (&mode, self.record.step_mut(step_id)) {
            step.state = StepState::Queued;
            step.queued_at = Some(OffsetDateTime::now_utc());
        }

        let plan = self.plan.clone();
        let catalog = self.services.catalog.clone();
        let files = self.services.store.artifacts().clone();
        let step_id = step_id.to_string();
        let addr = ctx.address();
        let run_name = self.record.name.clone();
        actix::spawn(async move {
            let outcome = prepare(&plan, &catalog, &files, &step_id, inputs, &run_name).await;
            addr.do_send(StepPrepared {
                step_id,
                mode,
                outcome,
            });
        });
    }

    /// Picks up a run found unfinished in the store: steps in flight on a node, or queued
    /// again to check a node they left, are resumed there (the node asks its service before
    /// sending anything), steps queued but never placed are queued again, and steps being
    /// prepared start over.
    fn resume_in_flight(&mut self, ctx: &mut Context<Self>) {
        let mut resumed = Vec::new();
        for step in self
            .record
            .steps
            .iter_mut()
            .filter(|s| !s.state.is_terminal())
        {
            match (step.node_holding_work().map(str::to_string), &step.remote) {
                (Some(node), Some(_)) => resumed.push((step.id.clone(), node)),
                (None, Some(_)) => resumed.push((step.id.clone(), String::new())),
                _ => step.state = StepState::Pending,
            }
        }
        for (step_id, node) in resumed {
            info!(run_id = %self.record.id, step = %step_id, node = %node, "resuming step");
            let mode = if node.is_empty() {
                Dispatch::Fresh
            } else {
                Dispatch::Resume { node }
            };
            self.prepare_step(&step_id, mode, ctx);
        }
    }

    /// The artifacts of a step's inputs, in the plan's input order.
    fn input_artifacts(&self, step_id: &str) -> Result<Vec<InputArtifact>, StepError> {
        let files = self.services.store.artifacts();
        let mut inputs = Vec::new();
        let Some(planned) = self.plan.step(step_id) else {
            return Ok(inputs);
        };
        for input in &planned.inputs {
            let Some(upstream) = self.record.step(&input.from) else {
                continue;
            };
            for meta in &upstream.artifacts {
                inputs.push(InputArtifact {
                    from_step: input.from.clone(),
                    path: files.path(&meta.id),
                    meta: meta.clone(),
                    text: None,
                });
            }
        }
        Ok(inputs)
    }

    fn on_prepared(&mut self, prepared: StepPrepared, ctx: &mut Context<Self>) {
        let StepPrepared {
            step_id,
            mode,
            outcome,
        } = prepared;
        if self.record.state.is_terminal() {
            return;
        }
        match (outcome, mode) {
            (Err(error), _) => self.fail_step(&step_id, error, ctx),
            (Ok(Prepared::Done(artifacts)), _) => self.succeed_step(&step_id, artifacts, ctx),
            (Ok(Prepared::Remote(job)), Dispatch::Fresh) => {
                self.pending_jobs.insert(step_id.clone(), job);
                self.dispatch(&step_id, AttemptOptions::default(), ctx);
            }
            (Ok(Prepared::Remote(job)), Dispatch::Resume { node }) => {
                self.pending_jobs.insert(step_id.clone(), job);
                self.requeue_resumed(&step_id, node, ctx.address());
            }
        }
    }

    /// Queues work found in flight again, as it was: same attempt, same remote id, on the
    /// node it was sent to. Nothing changed in the record, so nothing needs persisting.
    fn requeue_resumed(&mut self, step_id: &str, node: String, addr: Addr<WorkflowRun>) {
        let (Some(job), Some(step)) = (self.pending_jobs.get(step_id), self.record.step(step_id))
        else {
            return;
        };
        let Some(requirement) = self.plan.step(step_id).and_then(|s| s.requirement.clone()) else {
            return;
        };
        let Some((remote_id, server_id)) = remote_ids(step.remote.as_ref()) else {
            return;
        };
        let key = TaskKey {
            run_id: self.record.id.clone(),
            step_id: step_id.to_string(),
            attempt: step.attempts,
        };
        let mut task = Self::task(addr, key, requirement, job.clone(), remote_id);
        task.lease = self.lease.clone();
        task.server_id = server_id;
        let task = Task {
            resume: true,
            pinned_node: Some(node),
            ..task
        };
        self.services.scheduler.do_send(Enqueue(task));
    }

    fn task(
        addr: Addr<WorkflowRun>,
        key: TaskKey,
        requirement: crate::workflow::Requirement,
        job: RemoteJob,
        remote_id: String,
    ) -> Task {
        Task {
            key,
            requirement,
            job,
            remote_id,
            server_id: None,
            updates: addr.clone().recipient(),
            placement: addr.clone().recipient(),
            server_ids: addr.recipient(),
            resume: false,
            pinned_node: None,
            left_node: None,
            avoid_nodes: Vec::new(),
            more_vram_than: None,
            lease: None,
        }
    }

    /// Records the remote id of a new attempt, then queues the task once that is durable.
    fn dispatch(&mut self, step_id: &str, options: AttemptOptions, ctx: &mut Context<Self>) {
        let Some(job) = self.pending_jobs.get(step_id).cloned() else {
            return;
        };
        let Some(requirement) = self.plan.step(step_id).and_then(|s| s.requirement.clone()) else {
            return;
        };
        let run_id = self.record.id.clone();
        let Some(step) = self.record.step_mut(step_id) else {
            return;
        };
        let known = remote_ids(step.remote.as_ref());
        // An attempt that first checks the old node keeps both ids, the server's included:
        // that is what the node knows the work by.
        let (remote_id, server_id, check_first_on) = match (known, options.check_first_on) {
            (Some((id, server_id)), Some(node)) => (id, server_id, Some(node)),
            _ => (uuid::Uuid::new_v4().to_string(), None, None),
        };
        step.attempts += 1;
        step.state = StepState::Queued;
        step.remote = Some(match requirement.service {
            Service::ComfyUi => RemoteRef::Comfyui {
                prompt_id: remote_id.clone(),
                server_prompt_id: server_id.clone(),
            },
            Service::LangFlow => RemoteRef::Langflow {
                session_id: remote_id.clone(),
            },
        });
        let key = TaskKey {
            run_id,
            step_id: step_id.to_string(),
            attempt: step.attempts,
        };
        step.node = None;
        step.check_first_on = check_first_on.clone();
        step.error = None;
        let step = step.clone();
        self.publish_step(&step);

        let mut task = Self::task(ctx.address(), key, requirement, job, remote_id);
        task.lease = self.lease.clone();
        let task = Task {
            server_id,
            avoid_nodes: options.avoid_nodes,
            more_vram_than: options.more_vram_than,
            resume: check_first_on.is_some(),
            pinned_node: check_first_on,
            ..task
        };
        self.persist_then(ctx, move |act, _ctx| {
            act.services.scheduler.do_send(Enqueue(task));
        });
    }

    fn succeed_step(
        &mut self,
        step_id: &str,
        artifacts: Vec<ArtifactMeta>,
        ctx: &mut Context<Self>,
    ) {
        let Some(step) = self.record.step_mut(step_id) else {
            return;
        };
        if step.state.is_terminal() {
            return;
        }
        step.state = StepState::Succeeded;
        step.finished_at = Some(OffsetDateTime::now_utc());
        step.started_at.get_or_insert(OffsetDateTime::now_utc());
        step.progress = Some(1.0);
        step.artifacts = artifacts;
        let step = step.clone();
        info!(run_id = %self.record.id, step = %step_id, artifacts = step.artifacts.len(),
            "step succeeded");
        self.pending_jobs.remove(step_id);
        self.publish_step(&step);
        self.persist_then(ctx, |act, ctx| act.advance(ctx));
    }

    fn fail_step(&mut self, step_id: &str, error: StepError, ctx: &mut Context<Self>) {
        warn!(run_id = %self.record.id, step = %step_id, error = %error.message, "step failed");
        let Some(step) = self.record.step_mut(step_id) else {
            return;
        };
        if step.state.is_terminal() {
            return;
        }
        step.state = StepState::Failed;
        step.finished_at = Some(OffsetDateTime::now_utc());
        step.error = Some(error.clone());
        let step = step.clone();
        self.pending_jobs.remove(step_id);
        self.publish_step(&step);

        if self.plan.options().fail_fast {
            self.record.error = Some(format!("step {step_id} failed: {}", error.message));
            self.stop_remaining(StepState::Skipped);
        }
        self.persist_then(ctx, |act, ctx| act.advance(ctx));
    }

    /// Ends every step that has not ended: queued and running ones are aborted on their nodes.
    fn stop_remaining(&mut self, running_state: StepState) {
        let now = OffsetDateTime::now_utc();
        let mut any_remote = false;
        let mut prompts = Vec::new();
        for step in self
            .record
            .steps
            .iter_mut()
            .filter(|s| !s.state.is_terminal())
        {
            any_remote |= step.state != StepState::Pending;
            prompts.extend(placed_prompt(step));
            step.state = if step.state == StepState::Pending {
                StepState::Skipped
            } else {
                running_state
            };
            step.finished_at = Some(now);
        }
        if any_remote {
            self.services.scheduler.do_send(CancelRun {
                run_id: self.record.id.clone(),
                prompts,
            });
        }
        let ended: Vec<StepRecord> = self
            .record
            .steps
            .iter()
            .filter(|s| s.finished_at == Some(now))
            .cloned()
            .collect();
        for step in &ended {
            self.publish_step(step);
        }
    }

    fn finish_run(&mut self, ctx: &mut Context<Self>) {
        if self.record.state.is_terminal() {
            return;
        }
        let all_succeeded = self
            .record
            .steps
            .iter()
            .all(|s| s.state == StepState::Succeeded);
        self.record.state = if all_succeeded {
            RunState::Succeeded
        } else {
            RunState::Failed
        };
        if !all_succeeded && self.record.error.is_none() {
            let failed: Vec<&str> = self
                .record
                .steps
                .iter()
                .filter(|s| s.state == StepState::Failed)
                .map(|s| s.id.as_str())
                .collect();
            self.record.error = Some(format!("failed steps: {}", failed.join(", ")));
        }
        self.end(ctx);
    }

    /// Records the terminal state, tells everyone, and leaves the registry. The actor then
    /// stops by itself once no one holds its address.
    fn end(&mut self, ctx: &mut Context<Self>) {
        self.record.finished_at = Some(OffsetDateTime::now_utc());
        info!(run_id = %self.record.id, state = ?self.record.state, "run ended");
        self.persist_then(ctx, |act, _ctx| {
            act.publish(Activity::RunState {
                run_id: act.record.id.clone(),
                state: act.record.state,
                error: act.record.error.clone(),
            });
            act.services.registry.remove(&act.record.id);
        });
    }

    fn on_task_update(&mut self, update: TaskUpdate, ctx: &mut Context<Self>) {
        let TaskUpdate { key, node, event } = update;
        let Some(step) = self.record.step(&key.step_id) else {
            return;
        };
        // Updates of an older attempt, or of a step that already ended, change nothing.
        if step.attempts != key.attempt || step.state.is_terminal() {
            debug!(task = %key, "stale task update ignored");
            return;
        }
        match event {
            TaskEvent::Submitted => self.set_step_state(&key.step_id, StepState::Submitted, ctx),
            TaskEvent::Started => self.set_step_state(&key.step_id, StepState::Running, ctx),
            TaskEvent::Progress { value, max, detail } => {
                if let Some(step) = self.record.step_mut(&key.step_id) {
                    if max > 0.0 {
                        step.progress = Some((value / max).clamp(0.0, 1.0) as f32);
                    }
                }
                self.publish(Activity::StepProgress {
                    run_id: key.run_id,
                    step_id: key.step_id,
                    node,
                    value,
                    max,
                    detail,
                });
            }
            TaskEvent::Preview { mime, bytes } => self.publish(Activity::StepPreview {
                run_id: key.run_id,
                step_id: key.step_id,
                mime,
                data: base64_encode(&bytes),
            }),
            TaskEvent::Notice(message) => self.publish(Activity::StepNotice {
                run_id: key.run_id,
                step_id: key.step_id,
                message,
            }),
            TaskEvent::Succeeded { artifacts } => self.succeed_step(&key.step_id, artifacts, ctx),
            TaskEvent::Failed(failure) => self.task_failed(&key, &node, failure, ctx),
            TaskEvent::Cancelled => {
                if let Some(step) = self.record.step_mut(&key.step_id) {
                    step.state = StepState::Cancelled;
                    step.finished_at = Some(OffsetDateTime::now_utc());
                }
                self.persist_then(ctx, |act, ctx| act.advance(ctx));
            }
        }
    }

    /// Decides what a failed attempt leads to: one retry on a roomier node after running out
    /// of memory, a later attempt for failures that may pass, or the step's failure.
    fn task_failed(
        &mut self,
        key: &TaskKey,
        node: &str,
        failure: TaskFailure,
        ctx: &mut Context<Self>,
    ) {
        let step_id = key.step_id.as_str();
        let Some(planned) = self.plan.step(step_id) else {
            return;
        };
        let policy = planned.retry();
        let message = &failure.error.message;
        // Failed attempts that count against the policy: moves off a lost node do not.
        let attempts = if failure.retryable && !failure.node_lost {
            let charged = self
                .charged_attempts
                .entry(step_id.to_string())
                .or_default();
            *charged += 1;
            *charged
        } else {
            self.charged_attempts.get(step_id).copied().unwrap_or(0)
        };

        if failure.node_lost {
            // Not the step's fault: place it again at once, checking the old node first in
            // case it is back; the scheduler moves it on if that node stays away.
            self.notice(step_id, format!("{message}; placing the step again"));
            let options = AttemptOptions {
                check_first_on: (!node.is_empty()).then(|| node.to_string()),
                ..AttemptOptions::default()
            };
            self.dispatch(step_id, options, ctx);
        } else if failure.out_of_memory
            && !node.is_empty()
            && self.oom_retried.insert(step_id.into())
        {
            self.notice(
                step_id,
                format!("out of memory on {node}; retrying on a node with more free VRAM"),
            );
            let options = AttemptOptions {
                avoid_nodes: vec![node.to_string()],
                more_vram_than: Some(node.to_string()),
                check_first_on: None,
            };
            self.dispatch(step_id, options, ctx);
        } else if failure.retryable && policy.allows_another(attempts) {
            let delay = policy.backoff(attempts);
            self.notice(
                step_id,
                format!(
                    "attempt {attempts} of {} failed ({message}); retrying in {delay:?}",
                    policy.attempts
                ),
            );
            let step_id = step_id.to_string();
            // The failed attempt's work may still exist on its node: check there first.
            let options = AttemptOptions {
                check_first_on: (!node.is_empty()).then(|| node.to_string()),
                ..AttemptOptions::default()
            };
            ctx.run_later(delay, move |act, ctx| {
                let still_wanted = act
                    .record
                    .step(&step_id)
                    .is_some_and(|s| !s.state.is_terminal());
                if still_wanted && !act.record.state.is_terminal() {
                    act.dispatch(&step_id, options, ctx);
                }
            });
        } else {
            self.fail_step(step_id, failure.error, ctx);
        }
    }

    fn notice(&self, step_id: &str, message: String) {
        info!(run_id = %self.record.id, step = %step_id, "{message}");
        self.publish(Activity::StepNotice {
            run_id: self.record.id.clone(),
            step_id: step_id.to_string(),
            message,
        });
    }

    fn set_step_state(&mut self, step_id: &str, state: StepState, ctx: &mut Context<Self>) {
        let Some(step) = self.record.step_mut(step_id) else {
            return;
        };
        if step.state == state {
            return;
        }
        step.state = state;
        if state == StepState::Running {
            step.started_at = Some(OffsetDateTime::now_utc());
        }
        let step = step.clone();
        self.publish_step(&step);
        self.persist_then(ctx, |_, _| {});
    }
}

/// The ComfyUI prompt a step's record places on a node, if any.
fn placed_prompt(step: &StepRecord) -> Option<PlacedPrompt> {
    let node = step.node_holding_work()?.to_string();
    let Some(RemoteRef::Comfyui {
        prompt_id,
        server_prompt_id,
    }) = &step.remote
    else {
        return None;
    };
    Some(PlacedPrompt {
        node,
        step_id: step.id.clone(),
        prompt_id: prompt_id.clone(),
        server_id: server_prompt_id.clone(),
    })
}

/// Our id of a step's remote work, and the service's own id for it where one is recorded.
fn remote_ids(remote: Option<&RemoteRef>) -> Option<(String, Option<String>)> {
    match remote? {
        RemoteRef::Comfyui {
            prompt_id,
            server_prompt_id,
        } => Some((prompt_id.clone(), server_prompt_id.clone())),
        RemoteRef::Langflow { session_id } => Some((session_id.clone(), None)),
    }
}

/// Does a step's daemon-side part: reads text inputs, renders the job, and runs it when the
/// daemon itself is the one to run it.
async fn prepare(
    plan: &Plan,
    catalog: &Catalog,
    files: &crate::store::ArtifactFiles,
    step_id: &str,
    mut inputs: Vec<InputArtifact>,
    run_name: &str,
) -> Result<Prepared, StepError> {
    for input in inputs
        .iter_mut()
        .filter(|i| i.meta.kind == ArtifactKind::Text)
    {
        if input.meta.size > MAX_TEXT_INPUT {
            return Err(StepError {
                message: format!(
                    "text from step {} is {} bytes, more than the {MAX_TEXT_INPUT} a prompt takes",
                    input.from_step, input.meta.size
                ),
                details: None,
            });
        }
        let text = tokio::fs::read_to_string(&input.path)
            .await
            .map_err(|err| StepError {
                message: format!("cannot read the text from step {}: {err}", input.from_step),
                details: None,
            })?;
        input.text = Some(text);
    }
    let planned = plan.step(step_id).ok_or_else(|| StepError {
        message: format!("step {step_id} is not in the plan of run {run_name}"),
        details: None,
    })?;
    let job = planned.render(&inputs, catalog).map_err(|err| StepError {
        message: format!("step {step_id} cannot be prepared: {err}"),
        details: None,
    })?;
    match job {
        Job::Text(text) => {
            let meta = files
                .put_bytes(
                    text.into_bytes().into(),
                    &format!("{step_id}.txt"),
                    ArtifactKind::Text,
                    "text/plain; charset=utf-8",
                )
                .await
                .map_err(|err| StepError {
                    message: err.to_string(),
                    details: None,
                })?;
            Ok(Prepared::Done(vec![meta]))
        }
        Job::Collect => Ok(Prepared::Done(
            inputs.into_iter().map(|input| input.meta).collect(),
        )),
        Job::Comfy(job) => Ok(Prepared::Remote(RemoteJob::Comfy(job))),
        Job::Langflow(job) => Ok(Prepared::Remote(RemoteJob::Langflow(job))),
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Actor for WorkflowRun {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        debug!(run_id = %self.record.id, "run actor started");
        if self.record.state == RunState::Queued {
            self.publish(Activity::RunSubmitted {
                run_id: self.record.id.clone(),
                name: self.record.name.clone(),
                steps: self.record.steps.iter().map(|s| s.id.clone()).collect(),
            });
        }
        if std::mem::take(&mut self.resuming) {
            self.resume_in_flight(ctx);
        }
        self.advance(ctx);
    }
}

impl Supervised for WorkflowRun {
    /// Tasks in flight keep reporting to this address; steps that were being prepared are
    /// set back to pending so `started` prepares them again.
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        warn!(run_id = %self.record.id, "run actor restarting");
        for step in self.record.steps.iter_mut() {
            if step.state == StepState::Queued && step.remote.is_none() {
                step.state = StepState::Pending;
            }
        }
    }
}

impl Handler<CancelWorkflow> for WorkflowRun {
    type Result = ();

    fn handle(&mut self, _msg: CancelWorkflow, ctx: &mut Self::Context) {
        if self.record.state.is_terminal() {
            return;
        }
        info!(run_id = %self.record.id, "run cancelled");
        self.stop_remaining(StepState::Cancelled);
        self.record.state = RunState::Cancelled;
        self.record.error = Some("cancelled".into());
        self.end(ctx);
    }
}

impl Handler<Snapshot> for WorkflowRun {
    type Result = MessageResult<Snapshot>;

    fn handle(&mut self, _msg: Snapshot, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.record.clone())
    }
}

impl Handler<StepPrepared> for WorkflowRun {
    type Result = ();

    fn handle(&mut self, msg: StepPrepared, ctx: &mut Self::Context) {
        self.on_prepared(msg, ctx);
    }
}

impl Handler<TaskUpdate> for WorkflowRun {
    type Result = ();

    fn handle(&mut self, msg: TaskUpdate, ctx: &mut Self::Context) {
        self.on_task_update(msg, ctx);
    }
}

impl Handler<ConfirmPlacement> for WorkflowRun {
    type Result = ResponseActFuture<Self, Result<(), String>>;

    /// Records the node before the node sends anything; answers once that is durable. Work
    /// resumed where the record already places it (after a restart) changes nothing, and is
    /// neither saved again nor moved back to `assigned`.
    fn handle(&mut self, msg: ConfirmPlacement, _ctx: &mut Self::Context) -> Self::Result {
        let current = self.record.step(&msg.key.step_id).map(|s| {
            (
                s.attempts,
                s.state,
                s.node.as_deref() == Some(msg.node.as_str()),
            )
        });
        let wanted = current
            .filter(|(attempt, state, _)| *attempt == msg.key.attempt && !state.is_terminal());
        let Some((_, state, same_node)) = wanted else {
            return Box::pin(fut::ready(Err(format!(
                "task {} is no longer wanted",
                msg.key
            ))));
        };
        let placed = matches!(
            state,
            StepState::Assigned | StepState::Submitted | StepState::Running
        );
        if placed && same_node {
            return Box::pin(fut::ready(Ok(())));
        }
        if let Some(step) = self.record.step_mut(&msg.key.step_id) {
            step.state = StepState::Assigned;
            step.node = Some(msg.node.clone());
            step.check_first_on = None;
            let step = step.clone();
            self.publish_step(&step);
        }
        let store = self.services.store.clone();
        let record = self.record.clone();
        Box::pin(
            async move { store.save_run(&record).await.map_err(|err| err.to_string()) }
                .into_actor(self),
        )
    }
}

impl Handler<RecordServerId> for WorkflowRun {
    type Result = ResponseFuture<Result<(), String>>;

    /// Records the id the service runs the work under, and answers once that is durable:
    /// the node follows (and a cancel stops) the work by that id only after this, so a
    /// restart never has to guess it. The save waits in the actor's queue like every other
    /// transition, so no older snapshot of the record can overwrite it.
    fn handle(&mut self, msg: RecordServerId, ctx: &mut Self::Context) -> Self::Result {
        let wanted = self
            .record
            .step(&msg.key.step_id)
            .is_some_and(|s| s.attempts == msg.key.attempt && !s.state.is_terminal());
        let step = self.record.step_mut(&msg.key.step_id);
        let remote = step.as_ref().and_then(|s| s.remote.clone());
        let (Some(step), true, Some(RemoteRef::Comfyui { prompt_id, .. })) = (step, wanted, remote)
        else {
            let refused = format!("task {} is no longer wanted", msg.key);
            return Box::pin(async move { Err(refused) });
        };
        info!(run_id = %msg.key.run_id, step = %msg.key.step_id, prompt_id = %prompt_id,
            server_id = %msg.server_id, "the node runs the prompt under its own id");
        step.remote = Some(RemoteRef::Comfyui {
            prompt_id,
            server_prompt_id: Some(msg.server_id),
        });
        if step.state == StepState::Assigned {
            step.state = StepState::Submitted;
        }
        let step = step.clone();
        self.publish_step(&step);
        let (done, saved) = tokio::sync::oneshot::channel();
        let store = self.services.store.clone();
        let record = self.record.clone();
        let save = async move { store.save_run(&record).await };
        ctx.wait(save.into_actor(self).map(move |result, _act, _ctx| {
            let _ = done.send(result.map_err(|err| err.to_string()));
        }));
        Box::pin(async move {
            saved
                .await
                .unwrap_or_else(|_| Err("the run stopped before recording the id".into()))
        })
    }
}
