//! The `ActivityHub` actor: the daemon's live event stream.
//!
//! Runs, nodes and the scheduler publish [`Activity`] here; the hub numbers each event, keeps
//! the most recent ones for late subscribers and fans every event out to its subscribers (UI
//! WebSocket sessions, the CLI, MCP clients). A subscriber whose mailbox is full misses events
//! instead of slowing everyone else down, and is told how many it missed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::artifact::ArtifactMeta;
use crate::store::{RunState, StepError, StepState};
use crate::tunnel::LinkState;

/// How many recent events the hub keeps for subscribers that ask for history.
pub const HISTORY_LEN: usize = 2048;

/// Something noteworthy that happened, as every subscriber sees it (JSON, tagged by `type`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Activity {
    /// A run was accepted and stored.
    RunSubmitted {
        run_id: String,
        name: String,
        steps: Vec<String>,
    },
    /// A run changed state.
    RunState {
        run_id: String,
        state: RunState,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A step changed state.
    StepState {
        run_id: String,
        step_id: String,
        state: StepState,
        #[serde(skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        attempt: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<StepError>,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        artifacts: Vec<ArtifactMeta>,
    },
    /// A running step moved forward (`value` of `max` in its current phase).
    StepProgress {
        run_id: String,
        step_id: String,
        node: String,
        value: f64,
        max: f64,
        /// ComfyUI node id that reported the progress, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A preview image from a running step, base64-encoded.
    StepPreview {
        run_id: String,
        step_id: String,
        mime: String,
        data: String,
    },
    /// A non-fatal remark about a step, e.g. ComfyUI dropping some outputs of a prompt.
    StepNotice {
        run_id: String,
        step_id: String,
        message: String,
    },
    /// A node's health or availability changed.
    NodeState {
        node: String,
        available: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A node's SSH tunnel changed state (`connecting`, `up`, `down`, `failed`).
    TunnelState {
        node: String,
        state: LinkState,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        reconnects: u32,
    },
}

impl Activity {
    /// The run an event belongs to, for per-run subscriptions.
    pub fn run_id(&self) -> Option<&str> {
        match self {
            Activity::RunSubmitted { run_id, .. }
            | Activity::RunState { run_id, .. }
            | Activity::StepState { run_id, .. }
            | Activity::StepProgress { run_id, .. }
            | Activity::StepPreview { run_id, .. }
            | Activity::StepNotice { run_id, .. } => Some(run_id),
            Activity::NodeState { .. } | Activity::TunnelState { .. } => None,
        }
    }
}

/// An event as delivered: numbered in publication order and timestamped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActivityEvent {
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(flatten)]
    pub activity: Activity,
}

/// Publish an event to everyone subscribed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish(pub Activity);

/// What a subscriber receives.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub enum Delivery {
    /// Shared by every subscriber it goes to: a fan-out clones a pointer, not the event.
    Event(Arc<ActivityEvent>),
    /// The subscriber's mailbox was full and this many events were dropped for it.
    Missed(u64),
}

/// Which events a subscriber wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    All,
    Run(String),
}

impl Filter {
    fn matches(&self, activity: &Activity) -> bool {
        match self {
            Filter::All => true,
            Filter::Run(id) => activity.run_id() == Some(id.as_str()),
        }
    }
}

/// Subscribe a recipient; answers with a subscription id for [`Unsubscribe`].
#[derive(Message)]
#[rtype(result = "u64")]
pub struct Subscribe {
    pub recipient: Recipient<Delivery>,
    pub filter: Filter,
    /// Also deliver kept events with a sequence number above this one.
    pub replay_after: Option<u64>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe(pub u64);

/// Kept events after a cursor, for pollers (MCP, REST); answers the events and the newest
/// sequence number.
#[derive(Message)]
#[rtype(result = "(Vec<ActivityEvent>, u64)")]
pub struct EventsSince {
    pub after: u64,
    pub filter: Filter,
    pub limit: usize,
}

struct Subscriber {
    recipient: Recipient<Delivery>,
    filter: Filter,
    /// Events dropped since the last successful delivery.
    missed: u64,
}

/// The hub's state: recent events and current subscribers.
#[derive(Default)]
pub struct ActivityHub {
    next_seq: u64,
    recent: VecDeque<Arc<ActivityEvent>>,
    subscribers: HashMap<u64, Subscriber>,
    next_subscriber: u64,
}

impl ActivityHub {
    fn deliver(subscriber: &mut Subscriber, event: &Arc<ActivityEvent>) -> bool {
        if subscriber.missed > 0
            && subscriber
                .recipient
                .try_send(Delivery::Missed(subscriber.missed))
                .is_ok()
        {
            subscriber.missed = 0;
        }
        match subscriber
            .recipient
            .try_send(Delivery::Event(Arc::clone(event)))
        {
            Ok(()) => true,
            Err(SendError::Full(_)) => {
                subscriber.missed += 1;
                true
            }
            Err(SendError::Closed(_)) => false,
        }
    }
}

impl Actor for ActivityHub {
    type Context = Context<Self>;
}

impl Supervised for ActivityHub {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // Subscribers re-subscribe when their stream ends; keep the counter monotonic.
        self.subscribers.clear();
    }
}

impl Handler<Publish> for ActivityHub {
    type Result = ();

    fn handle(&mut self, Publish(activity): Publish, _ctx: &mut Self::Context) {
        self.next_seq += 1;
        let event = Arc::new(ActivityEvent {
            seq: self.next_seq,
            at: OffsetDateTime::now_utc(),
            activity,
        });
        self.subscribers.retain(|_, subscriber| {
            !subscriber.filter.matches(&event.activity) || Self::deliver(subscriber, &event)
        });
        if self.recent.len() == HISTORY_LEN {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }
}

impl Handler<Subscribe> for ActivityHub {
    type Result = u64;

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Self::Context) -> u64 {
        self.next_subscriber += 1;
        let mut subscriber = Subscriber {
            recipient: msg.recipient,
            filter: msg.filter,
            missed: 0,
        };
        if let Some(after) = msg.replay_after {
            for event in self.recent.iter().filter(|event| event.seq > after) {
                if subscriber.filter.matches(&event.activity) {
                    Self::deliver(&mut subscriber, event);
                }
            }
        }
        self.subscribers.insert(self.next_subscriber, subscriber);
        self.next_subscriber
    }
}

impl Handler<Unsubscribe> for ActivityHub {
    type Result = ();

    fn handle(&mut self, Unsubscribe(id): Unsubscribe, _ctx: &mut Self::Context) {
        self.subscribers.remove(&id);
    }
}

impl Handler<EventsSince> for ActivityHub {
    type Result = MessageResult<EventsSince>;

    fn handle(&mut self, msg: EventsSince, _ctx: &mut Self::Context) -> Self::Result {
        let events = self
            .recent
            .iter()
            .filter(|event| event.seq > msg.after && msg.filter.matches(&event.activity))
            .take(msg.limit)
            .map(|event| ActivityEvent::clone(event))
            .collect();
        MessageResult((events, self.next_seq))
    }
}
