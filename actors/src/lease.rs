//! The lease book: GPU nodes set aside for one client for a while.
//!
//! An MCP client (or any caller of [`crate::cluster::Cluster::allocate_lease`]) can reserve
//! nodes that fit a capability or model and a VRAM need, for a bounded time, before it
//! submits work. A run submitted under a lease has its steps placed only on the leased
//! nodes, and while the lease lives no other run is placed on them, so the holder gets
//! their slots. The scheduler asks [`LeaseBook::admits`] for every (task, node) pair; that
//! one call is the whole hook.
//!
//! Leases live in memory only: a daemon restart forgets them (the runs themselves are
//! durable and go on without the restriction). A lease ends when released or at its
//! deadline, whichever comes first; expired leases restrict nothing even before the
//! scheduler's periodic sweep removes them.
//!
//! The book is a mutex-guarded map shared by the scheduler actor and the cluster handle.
//! Every critical section is a short map operation with no `.await` inside.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;

use crate::config::NodeConfig;

/// Longest lease a caller may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 60 * 60);
/// Most nodes one lease may hold.
pub const MAX_LEASE_NODES: u32 = 64;

/// What a caller wants to reserve.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    /// A node capability (`image`, `video`, `comfyui`, or a LangFlow flow alias).
    pub capability: Option<String>,
    /// A model file the node lists (ComfyUI `models`).
    pub model: Option<String>,
    /// VRAM needed on one card, in MiB.
    pub vram_mb: u64,
    /// How many nodes.
    pub count: u32,
    /// How long the lease lasts.
    pub duration: Duration,
}

/// A node the book may lease, as the scheduler sees it now.
#[derive(Debug, Clone)]
pub struct LeaseCandidate {
    pub config: NodeConfig,
    pub available: bool,
}

/// A lease as callers see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LeaseView {
    pub id: String,
    pub nodes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub vram_mb: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Why a lease could not be granted or found.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LeaseError {
    #[error("invalid lease request: {0}")]
    Invalid(String),
    #[error(
        "only {found} of the {wanted} requested nodes are free, available and fit \
         ({requirement})"
    )]
    NotEnoughNodes {
        wanted: u32,
        found: u32,
        requirement: String,
    },
    #[error("no lease with id {0} (it may have expired or been released)")]
    NotFound(String),
}

struct Lease {
    view: LeaseView,
    deadline: Instant,
}

impl Lease {
    fn live(&self, now: Instant) -> bool {
        now < self.deadline
    }
}

/// Every lease, by id; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct LeaseBook {
    leases: Arc<Mutex<HashMap<String, Lease>>>,
}

impl LeaseBook {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Lease>> {
        // A panic while holding the lock cannot leave the map half-updated (every change is
        // one insert or remove), so a poisoned lock is still a consistent book.
        self.leases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Grants a lease on `count` candidates that fit the request and no live lease holds,
    /// preferring the candidates in the order given. All or nothing.
    pub fn allocate(
        &self,
        request: &LeaseRequest,
        candidates: &[LeaseCandidate],
    ) -> Result<LeaseView, LeaseError> {
        check_request(request)?;
        let now = Instant::now();
        let mut leases = self.lock();
        leases.retain(|_, lease| lease.live(now));
        let held: Vec<&str> = leases
            .values()
            .flat_map(|lease| lease.view.nodes.iter().map(String::as_str))
            .collect();
        let chosen: Vec<String> = candidates
            .iter()
            .filter(|candidate| candidate.available && fits(request, &candidate.config))
            .filter(|candidate| !held.contains(&candidate.config.name.as_str()))
            .take(request.count as usize)
            .map(|candidate| candidate.config.name.clone())
            .collect();
        if chosen.len() < request.count as usize {
            return Err(LeaseError::NotEnoughNodes {
                wanted: request.count,
                found: chosen.len() as u32,
                requirement: describe(request),
            });
        }
        let view = LeaseView {
            id: uuid::Uuid::new_v4().to_string(),
            nodes: chosen,
            capability: request.capability.clone(),
            model: request.model.clone(),
            vram_mb: request.vram_mb,
            expires_at: OffsetDateTime::now_utc() + request.duration,
        };
        leases.insert(
            view.id.clone(),
            Lease {
                view: view.clone(),
                deadline: now + request.duration,
            },
        );
        Ok(view)
    }

    /// Ends a lease now and answers what it was.
    pub fn release(&self, id: &str) -> Result<LeaseView, LeaseError> {
        let now = Instant::now();
        let mut leases = self.lock();
        match leases.remove(id) {
            Some(lease) if lease.live(now) => Ok(lease.view),
            _ => Err(LeaseError::NotFound(id.to_string())),
        }
    }

    /// The live lease with this id.
    pub fn get(&self, id: &str) -> Option<LeaseView> {
        let now = Instant::now();
        self.lock()
            .get(id)
            .filter(|lease| lease.live(now))
            .map(|lease| lease.view.clone())
    }

    /// Every live lease.
    pub fn list(&self) -> Vec<LeaseView> {
        let now = Instant::now();
        let mut views: Vec<LeaseView> = self
            .lock()
            .values()
            .filter(|lease| lease.live(now))
            .map(|lease| lease.view.clone())
            .collect();
        views.sort_by_key(|view| view.expires_at);
        views
    }

    /// The scheduler's hook: whether a task carrying `lease` may be placed on `node`.
    ///
    /// A task under a live lease goes only to that lease's nodes; a node under a live lease
    /// takes only that lease's tasks. A task naming a lease that has ended is treated as
    /// unleased.
    pub fn admits(&self, lease: Option<&str>, node: &str) -> bool {
        let now = Instant::now();
        let leases = self.lock();
        let holder = leases
            .values()
            .find(|held| held.live(now) && held.view.nodes.iter().any(|name| name == node));
        let own = lease
            .and_then(|id| leases.get(id))
            .filter(|own| own.live(now));
        match (own, holder) {
            (Some(own), Some(holder)) => own.view.id == holder.view.id,
            (Some(_), None) => false,
            (None, holder) => holder.is_none(),
        }
    }

    /// Forgets expired leases; answers whether any were, so the scheduler can place the
    /// tasks that waited for those nodes.
    pub fn expire_due(&self) -> bool {
        let now = Instant::now();
        let mut leases = self.lock();
        let before = leases.len();
        leases.retain(|_, lease| lease.live(now));
        leases.len() != before
    }
}

fn check_request(request: &LeaseRequest) -> Result<(), LeaseError> {
    if request.count == 0 || request.count > MAX_LEASE_NODES {
        return Err(LeaseError::Invalid(format!(
            "count must be 1 to {MAX_LEASE_NODES}, got {}",
            request.count
        )));
    }
    if request.duration.is_zero() || request.duration > MAX_LEASE {
        return Err(LeaseError::Invalid(format!(
            "duration must be 1 to {} seconds, got {}",
            MAX_LEASE.as_secs(),
            request.duration.as_secs()
        )));
    }
    if request.capability.is_none() && request.model.is_none() {
        return Err(LeaseError::Invalid(
            "name a capability or a model to lease nodes for".into(),
        ));
    }
    Ok(())
}

/// Whether a node can serve the request: capability, model and VRAM on one card. A node
/// that lists no GPUs is not ruled out on VRAM, as in task placement.
fn fits(request: &LeaseRequest, node: &NodeConfig) -> bool {
    let capable = request.capability.as_deref().is_none_or(|capability| {
        let comfy = node.comfyui.as_ref().is_some_and(|comfy| {
            capability == crate::workflow::GENERIC_COMFY
                || comfy.capabilities.iter().any(|c| c == capability)
        });
        let flow = node
            .langflow
            .as_ref()
            .is_some_and(|langflow| langflow.flows.contains_key(capability));
        comfy || flow
    });
    let has_model = request.model.as_deref().is_none_or(|model| {
        node.comfyui
            .as_ref()
            .is_some_and(|comfy| comfy.models.iter().any(|m| m == model))
    });
    let vram = node.gpus.is_empty() || node.max_card_vram_mb() >= request.vram_mb;
    capable && has_model && vram
}

fn describe(request: &LeaseRequest) -> String {
    let mut parts = Vec::new();
    if let Some(capability) = &request.capability {
        parts.push(format!("capability {capability}"));
    }
    if let Some(model) = &request.model {
        parts.push(format!("model {model}"));
    }
    parts.push(format!("{} MiB VRAM", request.vram_mb));
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, capability: &str, vram_mb: u64) -> LeaseCandidate {
        let config = serde_json::json!({
            "name": name,
            "gpus": [{"model": "card", "vram_mb": vram_mb}],
            "comfyui": {
                "url": "http://127.0.0.1:1",
                "capabilities": [capability],
                "models": ["flux1-dev.safetensors"]
            }
        });
        LeaseCandidate {
            config: serde_json::from_value(config).expect("a node config"),
            available: true,
        }
    }

    fn request(capability: &str, count: u32) -> LeaseRequest {
        LeaseRequest {
            capability: Some(capability.into()),
            model: None,
            vram_mb: 16000,
            count,
            duration: Duration::from_secs(60),
        }
    }

    #[test]
    fn leased_nodes_take_only_their_lease() {
        let book = LeaseBook::default();
        let nodes = [node("a", "image", 24000), node("b", "image", 24000)];
        let lease = book
            .allocate(&request("image", 1), &nodes)
            .expect("granted");
        assert_eq!(lease.nodes, vec!["a".to_string()]);
        assert!(book.admits(Some(&lease.id), "a"));
        assert!(!book.admits(Some(&lease.id), "b"));
        assert!(!book.admits(None, "a"));
        assert!(book.admits(None, "b"));
        book.release(&lease.id).expect("released");
        assert!(book.admits(None, "a"));
        assert!(
            book.admits(Some(&lease.id), "b"),
            "an ended lease restricts nothing"
        );
    }

    #[test]
    fn refuses_what_it_cannot_grant() {
        let book = LeaseBook::default();
        let nodes = [node("a", "image", 24000), node("v", "video", 8000)];
        let err = book.allocate(&request("image", 2), &nodes).unwrap_err();
        assert!(
            matches!(err, LeaseError::NotEnoughNodes { found: 1, .. }),
            "{err}"
        );
        let err = book.allocate(&request("video", 1), &nodes).unwrap_err();
        assert!(
            matches!(err, LeaseError::NotEnoughNodes { found: 0, .. }),
            "{err}"
        );
        book.allocate(&request("image", 1), &nodes)
            .expect("granted");
        let err = book.allocate(&request("image", 1), &nodes).unwrap_err();
        assert!(
            matches!(err, LeaseError::NotEnoughNodes { .. }),
            "a held node: {err}"
        );
        let zero = LeaseRequest {
            count: 0,
            ..request("image", 1)
        };
        assert!(matches!(
            book.allocate(&zero, &nodes),
            Err(LeaseError::Invalid(_))
        ));
        assert!(matches!(book.release("nope"), Err(LeaseError::NotFound(_))));
    }

    #[test]
    fn model_requests_match_listed_models() {
        let book = LeaseBook::default();
        let nodes = [node("a", "image", 24000)];
        let by_model = LeaseRequest {
            capability: None,
            model: Some("flux1-dev.safetensors".into()),
            ..request("image", 1)
        };
        assert!(book.allocate(&by_model, &nodes).is_ok());
    }

    #[test]
    fn expired_leases_are_swept() {
        let book = LeaseBook::default();
        let nodes = [node("a", "image", 24000)];
        let short = LeaseRequest {
            duration: Duration::from_nanos(1),
            ..request("image", 1)
        };
        let lease = book.allocate(&short, &nodes).expect("granted");
        // A nanosecond has passed by the time the next statement runs.
        assert!(book.admits(None, "a"));
        assert!(book.get(&lease.id).is_none());
        assert!(book.expire_due());
        assert!(!book.expire_due());
    }
}
