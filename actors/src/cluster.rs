//! The cluster handle: starts the actors and answers what the daemon's interfaces ask.
//!
//! REST, the UI WebSocket, the MCP server and the CLI demo all go through [`Cluster`], so a
//! workflow submitted any way is validated, stored and run the same way.

use std::sync::Arc;

use actix::prelude::*;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::activity::{Activity, ActivityHub, Publish};
use crate::config::ClusterConfig;
use crate::lease::{LeaseBook, LeaseCandidate, LeaseError, LeaseRequest, LeaseView};
use crate::node::{GpuNode, Restart};
use crate::run::{CancelWorkflow, RunRegistry, RunServices, Snapshot, WorkflowRun};
use crate::scheduler::{LeasesChanged, ListNodes, NodeView, RegisterNode, Scheduler};
use crate::store::{RemoteRef, RunRecord, RunState, StepError, StepState, Store, StoreError};
use crate::tunnel::{self, GetTunnel, Reconnect, Tunnel, TunnelError, TunnelView};
use crate::workflow::{plan_workflow, Catalog, TemplateLibrary, ValidationIssue};

/// Why a request about runs could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the workflow is invalid ({} problems)", .0.len())]
    Invalid(Vec<ValidationIssue>),
    #[error("no run with id {0}")]
    NotFound(String),
    #[error("node {0} has no SSH tunnel")]
    NoTunnel(String),
    #[error("no node named {0}")]
    NoNode(String),
    #[error("run {id} has already ended ({state:?})")]
    AlreadyEnded { id: String, state: RunState },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the {0} actor is not running")]
    ActorGone(&'static str),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// Boxed: tunnel errors carry paths and sources, and only startup returns them.
    #[error(transparent)]
    Tunnel(Box<TunnelError>),
}

impl From<TunnelError> for ClusterError {
    fn from(err: TunnelError) -> ClusterError {
        ClusterError::Tunnel(Box::new(err))
    }
}

/// Handle to the running cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    services: RunServices,
    config: Arc<ClusterConfig>,
    leases: LeaseBook,
    /// Each node's actor, by node name, in config order.
    nodes: Arc<Vec<(String, Addr<GpuNode>)>>,
    /// Each SSH-reached node's tunnel, by node name, in config order.
    tunnels: Arc<Vec<(String, Addr<Tunnel>)>>,
}

impl Cluster {
    /// Starts the scheduler, the activity hub, one node actor per configured node and one
    /// tunnel actor per node reached through SSH, all under supervision. Must be called
    /// inside a running actix system. Fails only when a forward's local port cannot be
    /// bound (or a service names a forward its node lacks).
    pub fn start(
        mut config: ClusterConfig,
        templates: TemplateLibrary,
        store: Store,
    ) -> Result<Cluster, ClusterError> {
        // Forwards are bound first: the services' URLs point at their local ends.
        let mut bound = tunnel::prepare(&mut config.nodes)?;
        // Tunnels share one arbiter (thread) of their own, so encryption and pumping run
        // beside the daemon's actors rather than between them.
        let tunnel_arbiter = (!bound.is_empty()).then(Arbiter::new);
        let mut tunnels = Vec::new();
        let mut nodes = Vec::new();
        let hub = Supervisor::start(|_| ActivityHub::default());
        let grace = std::time::Duration::from_millis(config.node_grace_ms);
        let leases = LeaseBook::default();
        let book = leases.clone();
        let scheduler = Supervisor::start(move |_| Scheduler::with_leases(grace, book));
        for node in &config.nodes {
            let node_config = node.clone();
            let (sched, hub_addr, files) =
                (scheduler.clone(), hub.clone(), store.artifacts().clone());
            let addr = Supervisor::start(move |_| {
                GpuNode::new(node_config, sched, hub_addr, files, grace)
            });
            if let (Some(ssh), Some(arbiter), Some(listeners)) = (
                node.ssh.clone(),
                tunnel_arbiter.as_ref(),
                bound.remove(&node.name),
            ) {
                let (name, gpu_node, hub_addr) = (node.name.clone(), addr.clone(), hub.clone());
                let tunnel = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
                    Tunnel::new(name, ssh, listeners, gpu_node, hub_addr)
                });
                tunnels.push((node.name.clone(), tunnel));
            }
            nodes.push((node.name.clone(), addr.clone()));
            scheduler.do_send(RegisterNode {
                config: node.clone(),
                addr,
            });
        }
        let catalog = Arc::new(Catalog::new(&config, templates));
        let services = RunServices {
            store,
            catalog,
            scheduler,
            hub,
            registry: RunRegistry::default(),
        };
        Ok(Cluster {
            services,
            config: Arc::new(config),
            leases,
            nodes: Arc::new(nodes),
            tunnels: Arc::new(tunnels),
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn catalog(&self) -> &Catalog {
        &self.services.catalog
    }

    pub fn store(&self) -> &Store {
        &self.services.store
    }

    pub fn hub(&self) -> &Addr<ActivityHub> {
        &self.services.hub
    }

    /// Validates and plans a document, stores the run durably, then starts it. The returned
    /// record is what was stored: answering only after the write is what makes an
    /// acknowledged run survive a crash.
    pub async fn submit(&self, document: serde_json::Value) -> Result<RunRecord, ClusterError> {
        self.submit_leased(document, None).await
    }

    /// [`Cluster::submit`] under a lease: every step runs only on the lease's nodes. The
    /// lease must be live when the run is submitted.
    pub async fn submit_leased(
        &self,
        document: serde_json::Value,
        lease: Option<&str>,
    ) -> Result<RunRecord, ClusterError> {
        if let Some(id) = lease {
            if self.leases.get(id).is_none() {
                return Err(LeaseError::NotFound(id.to_string()).into());
            }
        }
        let plan =
            plan_workflow(&document, &self.services.catalog).map_err(ClusterError::Invalid)?;
        let id = uuid::Uuid::now_v7().to_string();
        let record = WorkflowRun::new_record(id, &plan, document);
        self.services.store.save_run(&record).await?;
        info!(run_id = %record.id, name = %record.name, steps = record.steps.len(), "run accepted");
        let lease = lease.map(str::to_string);
        WorkflowRun::start(record.clone(), plan, self.services.clone(), lease);
        Ok(record)
    }

    /// The run as it stands: live (with progress) while it runs, from the store otherwise.
    pub async fn run(&self, id: &str) -> Result<RunRecord, ClusterError> {
        if let Some(addr) = self.services.registry.get(id) {
            if let Ok(record) = addr.send(Snapshot).await {
                return Ok(record);
            }
        }
        self.services
            .store
            .get_run(id)?
            .ok_or_else(|| ClusterError::NotFound(id.to_string()))
    }

    /// Stored runs, newest first.
    pub fn runs(&self, limit: usize, before: Option<&str>) -> Result<Vec<RunRecord>, ClusterError> {
        Ok(self.services.store.list_runs(limit, before)?)
    }

    /// Cancels a run and answers its record once the cancellation is stored. A run the
    /// store holds as unfinished but that has no live actor (it was not resumed) is marked
    /// cancelled in the store directly.
    pub async fn cancel(&self, id: &str) -> Result<RunRecord, ClusterError> {
        let Some(addr) = self.services.registry.get(id) else {
            let record = self.services.store.get_run(id)?;
            return match record {
                Some(record) if record.state.is_terminal() => Err(ClusterError::AlreadyEnded {
                    id: id.into(),
                    state: record.state,
                }),
                Some(record) => {
                    info!(run_id = %id, "run cancelled (it had no live actor)");
                    self.end_stored(
                        record,
                        RunState::Cancelled,
                        StepState::Cancelled,
                        "cancelled",
                    )
                    .await
                }
                None => Err(ClusterError::NotFound(id.into())),
            };
        };
        addr.send(CancelWorkflow)
            .await
            .map_err(|_| ClusterError::ActorGone("run"))?;
        // The cancel handler persisted before answering the next message: read it back.
        addr.send(Snapshot)
            .await
            .map_err(|_| ClusterError::ActorGone("run"))
    }

    /// Every node with its availability and load.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClusterError> {
        self.services
            .scheduler
            .send(ListNodes)
            .await
            .map_err(|_| ClusterError::ActorGone("scheduler"))
    }

    /// Every SSH tunnel with its state, counters and forwards, in config order.
    pub async fn tunnels(&self) -> Result<Vec<TunnelView>, ClusterError> {
        let asked = self
            .tunnels
            .iter()
            .map(|(_, tunnel)| tunnel.send(GetTunnel));
        let answers = futures_util::future::join_all(asked).await;
        answers
            .into_iter()
            .map(|answer| answer.map_err(|_| ClusterError::ActorGone("tunnel")))
            .collect()
    }

    /// Makes a node's tunnel start over (also out of `failed`); answers it as it stands
    /// once restarted.
    pub async fn reconnect_tunnel(&self, node: &str) -> Result<TunnelView, ClusterError> {
        let Some((_, tunnel)) = self.tunnels.iter().find(|(name, _)| name == node) else {
            return Err(ClusterError::NoTunnel(node.to_string()));
        };
        let gone = |_| ClusterError::ActorGone("tunnel");
        tunnel.send(Reconnect).await.map_err(gone)?;
        // The supervisor restarts the actor before it handles the next message.
        tunnel.send(GetTunnel).await.map_err(gone)
    }

    /// Starts a node's actor over (see [`Restart`]); answers its restart count after it.
    pub async fn restart_node(&self, node: &str) -> Result<u32, ClusterError> {
        let Some((_, addr)) = self.nodes.iter().find(|(name, _)| name == node) else {
            return Err(ClusterError::NoNode(node.to_string()));
        };
        addr.send(Restart)
            .await
            .map_err(|_| ClusterError::ActorGone("node"))
    }

    /// Reserves nodes that fit the request, among those available now.
    pub async fn allocate_lease(&self, request: &LeaseRequest) -> Result<LeaseView, ClusterError> {
        let views = self.nodes().await?;
        let candidates: Vec<LeaseCandidate> = self
            .config
            .nodes
            .iter()
            .map(|config| LeaseCandidate {
                config: config.clone(),
                available: views
                    .iter()
                    .any(|view| view.name == config.name && view.available),
            })
            .collect();
        let lease = self.leases.allocate(request, &candidates)?;
        info!(lease = %lease.id, nodes = ?lease.nodes, expires_at = %lease.expires_at,
            "lease granted");
        Ok(lease)
    }

    /// Ends a lease; tasks waiting for its nodes are placed.
    pub fn release_lease(&self, id: &str) -> Result<LeaseView, ClusterError> {
        let lease = self.leases.release(id)?;
        info!(lease = %lease.id, "lease released");
        self.services.scheduler.do_send(LeasesChanged);
        Ok(lease)
    }

    /// Every live lease.
    pub fn leases(&self) -> Vec<LeaseView> {
        self.leases.list()
    }

    /// How many runs are live.
    pub fn live_runs(&self) -> usize {
        self.services.registry.len()
    }

    /// Starts again every run the store holds as unfinished. Steps that were in flight are
    /// looked up on the node they were sent to (see [`WorkflowRun::resume`]). A run that no
    /// longer validates against this config (a node it needs is gone, say) cannot be
    /// planned, so it is marked failed instead, with the issues in its error.
    pub async fn resume_unfinished(&self) -> Result<usize, ClusterError> {
        let runs = self.services.store.unfinished_runs()?;
        let mut resumed = 0;
        for record in runs {
            let plan = match plan_workflow(&record.document, &self.services.catalog) {
                Ok(plan) => plan,
                Err(issues) => {
                    warn!(run_id = %record.id, problems = issues.len(),
                        "stored run no longer validates against this config; marking it failed");
                    let error = unresumable_error(&record, &issues);
                    self.end_stored(record, RunState::Failed, StepState::Failed, &error)
                        .await?;
                    continue;
                }
            };
            info!(run_id = %record.id, "resuming run");
            WorkflowRun::resume(record, plan, self.services.clone());
            resumed += 1;
        }
        Ok(resumed)
    }

    /// Ends a stored unfinished run that has no actor: steps that had started end in
    /// `started_state` with `error`, pending ones are skipped. The record is flushed before
    /// the change is published and answered.
    async fn end_stored(
        &self,
        mut record: RunRecord,
        state: RunState,
        started_state: StepState,
        error: &str,
    ) -> Result<RunRecord, ClusterError> {
        let now = OffsetDateTime::now_utc();
        let mut ended = Vec::new();
        for step in record.steps.iter_mut().filter(|s| !s.state.is_terminal()) {
            if step.state == StepState::Pending {
                step.state = StepState::Skipped;
            } else {
                step.state = started_state;
                step.error = Some(StepError {
                    message: error.to_string(),
                    details: None,
                });
            }
            step.finished_at = Some(now);
            ended.push(step.clone());
        }
        record.state = state;
        record.error = Some(error.to_string());
        record.finished_at = Some(now);
        self.services.store.save_run(&record).await?;

        let publish = |activity| self.services.hub.do_send(Publish(activity));
        for step in ended {
            publish(Activity::StepState {
                run_id: record.id.clone(),
                step_id: step.id,
                state: step.state,
                node: step.node,
                attempt: step.attempts,
                error: step.error,
                artifacts: step.artifacts,
            });
        }
        publish(Activity::RunState {
            run_id: record.id.clone(),
            state,
            error: record.error.clone(),
        });
        Ok(record)
    }
}

/// Why a stored run cannot be resumed: the validation issues (node and field), and the work
/// it had already sent to nodes, which nothing follows any more.
fn unresumable_error(record: &RunRecord, issues: &[ValidationIssue]) -> String {
    let issues: Vec<String> = issues.iter().map(describe_issue).collect();
    let mut error = format!(
        "the run no longer validates against this configuration: {}",
        issues.join("; ")
    );
    let sent: Vec<String> = record
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s.state,
                StepState::Assigned | StepState::Submitted | StepState::Running
            )
        })
        .filter_map(|s| {
            let node = s.node.as_deref()?;
            match s.remote.as_ref()? {
                RemoteRef::Comfyui {
                    prompt_id,
                    server_prompt_id,
                } => Some(format!(
                    "step {} (ComfyUI prompt {} on {node})",
                    s.id,
                    server_prompt_id.as_deref().unwrap_or(prompt_id)
                )),
                RemoteRef::Langflow { session_id } => Some(format!(
                    "step {} (LangFlow session {session_id} on {node})",
                    s.id
                )),
            }
        })
        .collect();
    if !sent.is_empty() {
        error.push_str(&format!(
            "; work already sent cannot be followed and may still run on its node: {}",
            sent.join(", ")
        ));
    }
    error
}

/// One validation issue with where it is: `node voice, field data.mode: [code] message`.
fn describe_issue(issue: &ValidationIssue) -> String {
    let place: Vec<String> = [
        issue.node.as_ref().map(|node| format!("node {node}")),
        issue.edge.as_ref().map(|edge| format!("edge {edge}")),
        issue.field.as_ref().map(|field| format!("field {field}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if place.is_empty() {
        issue.to_string()
    } else {
        format!("{}: {issue}", place.join(", "))
    }
}
