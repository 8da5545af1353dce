//! The activity feed MCP sessions read: one hub subscription, fanned out over a broadcast
//! channel.
//!
//! MCP sessions run as plain tokio tasks inside rmcp, outside any actix context, so they
//! cannot each host an actor to receive [`Delivery`] messages. One small actor does that for
//! all of them and republishes into a `tokio::sync::broadcast` channel, whose receivers are
//! `Send` and cost nothing while idle. A session that reads too slowly lags (its receiver
//! skips ahead) and re-reads what it needs from the cluster, like a WebSocket client that is
//! told it missed events.

use actix::prelude::*;
use multiplex_actors::activity::{ActivityEvent, ActivityHub, Delivery, Filter, Subscribe};
use tokio::sync::broadcast;
use tracing::debug;

/// Events buffered per session before it starts lagging.
const FEED_CAPACITY: usize = 1024;

/// The sending side; clone it to hand out receivers.
#[derive(Clone)]
pub struct ActivityFeed {
    sender: broadcast::Sender<ActivityEvent>,
}

impl ActivityFeed {
    /// Subscribes a forwarding actor to the hub. Must be called inside an actix system.
    pub fn start(hub: &Addr<ActivityHub>) -> ActivityFeed {
        let (sender, _) = broadcast::channel(FEED_CAPACITY);
        let forwarder = Forwarder {
            sender: sender.clone(),
        }
        .start();
        hub.do_send(Subscribe {
            recipient: forwarder.recipient(),
            filter: Filter::All,
            replay_after: None,
        });
        ActivityFeed { sender }
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ActivityEvent> {
        self.sender.subscribe()
    }
}

/// Republishes hub deliveries into the broadcast channel.
struct Forwarder {
    sender: broadcast::Sender<ActivityEvent>,
}

impl Actor for Forwarder {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The hub drops events for a full mailbox; a large one keeps bursts of progress
        // ticks from being lost before they reach the channel.
        ctx.set_mailbox_capacity(FEED_CAPACITY);
    }
}

impl Handler<Delivery> for Forwarder {
    type Result = ();

    fn handle(&mut self, delivery: Delivery, _ctx: &mut Self::Context) {
        match delivery {
            // No receiver is not an error: no MCP session is listening right now.
            Delivery::Event(event) => {
                let _ = self.sender.send(ActivityEvent::clone(&event));
            }
            Delivery::Missed(count) => debug!(count, "MCP activity feed missed events"),
        }
    }
}
