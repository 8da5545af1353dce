//! The `Tunnel` actor: one per node reached through SSH. It owns the SSH session, the local
//! listeners of the node's forwards, liveness checks and reconnection.
//!
//! Lifecycle (an explicit [`LinkState`]): `connecting` -> `up` -> (session lost) `down` ->
//! `connecting` ... with jittered exponential backoff between attempts, from
//! `backoff_initial_ms` doubling to `backoff_cap_ms`. A refusal that trying again cannot fix
//! (unknown or changed host key, a key the server refuses or that cannot be loaded) leaves
//! the tunnel `failed` with the reason, and it is not retried.
//!
//! Liveness: russh keepalives (`keepalive_interval_ms`, `keepalive_max`) close a session
//! whose server went silent; every `probe_interval_ms` a direct-tcpip channel is opened to
//! the first forward's target and closed again, which proves the session still carries
//! traffic (the box refusing the port still proves it; only silence past
//! `channel_open_timeout_ms` does not).
//!
//! When the session is lost, every forwarded connection is reset so its reader gets an
//! error, the listeners stay bound (services keep their addresses) but refuse connections
//! until the next session, and the node's `GpuNode` is told with [`TunnelLink`], so it is
//! unavailable for new work while its running tasks wait for it within the node's grace
//! period. The tunnel's state changes go to the activity stream.
//!
//! [`Reconnect`] stops the actor so that its supervisor restarts it: `restarting` drops the
//! session and resets the backoff, `started` connects again.
//!
//! Other actors talk to it only through [`GetTunnel`] and [`Reconnect`]; everything SSH
//! stays in this module and the node's configuration.

mod error;
mod forward;
mod hostkey;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use error::TunnelError;
pub use forward::Bound;
pub use hostkey::fingerprint;

use crate::activity::{Activity, ActivityHub, Publish};
use crate::config::{NodeConfig, SshConfig};
use crate::node::{GpuNode, TunnelLink};
use forward::{Counters, Live, PumpTiming};
use session::Pins;

/// How often the session's closed flag is looked at between probes.
const CLOSED_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// Where a tunnel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// A connection attempt is under way.
    Connecting,
    /// The session is open and the forwards carry connections.
    Up,
    /// The session was lost or an attempt failed; the next attempt is scheduled.
    Down,
    /// Refused for a reason retrying cannot fix; stays so until the daemon restarts.
    Failed,
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::Failed => "failed",
        };
        f.write_str(name)
    }
}

/// Ask a tunnel how it stands.
#[derive(Message)]
#[rtype(result = "TunnelView")]
pub struct GetTunnel;

/// Start over: drop the session and connect again from a fresh backoff, also out of
/// `failed` (after known_hosts or the key was fixed). Done by stopping the actor, so its
/// supervisor restarts it the way it would after any stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconnect;

/// The session opened (or could not be), for the actor incarnation that asked.
#[derive(Message)]
#[rtype(result = "()")]
struct Opened {
    generation: u32,
    result: Result<session::Session, TunnelError>,
}

/// A forward as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardView {
    pub name: String,
    pub local: SocketAddr,
    pub remote: String,
    pub open_channels: u64,
    pub channel_failures: u64,
}

/// A tunnel as the API and the CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelView {
    pub node: String,
    /// `user@host:port` of the box's SSH server.
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jump: Option<String>,
    pub state: LinkState,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// Connection attempts made, successful or not.
    pub attempts: u32,
    /// Sessions opened after the first one.
    pub reconnects: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub open_channels: u64,
    pub channels_opened: u64,
    pub channel_failures: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub restarts: u32,
    pub forwards: Vec<ForwardView>,
}

/// A forward's listener: bound before the actor starts, made a tokio listener in the
/// actor's arbiter on its first start, and kept across restarts.
struct Listener {
    spec: Arc<crate::config::ForwardConfig>,
    counters: Arc<Counters>,
    local: SocketAddr,
    bound: Option<std::net::TcpListener>,
    listener: Option<Arc<tokio::net::TcpListener>>,
}

/// The SSH tunnel of one node.
pub struct Tunnel {
    node: String,
    config: SshConfig,
    gpu_node: Addr<GpuNode>,
    hub: Addr<ActivityHub>,
    listeners: Vec<Listener>,
    /// The session forwarded connections use; `None` while there is none.
    current: watch::Sender<Option<Live>>,
    pins: Pins,
    state: LinkState,
    since: OffsetDateTime,
    last_error: Option<String>,
    attempts: u32,
    reconnects: u32,
    ever_up: bool,
    backoff: Duration,
    restarts: u32,
}

/// Binds the listeners of every node reached through SSH and points the node's forwarded
/// services at their local ends. Returns the bound listeners per node, for [`Tunnel::new`].
pub fn prepare(nodes: &mut [NodeConfig]) -> Result<HashMap<String, Vec<Bound>>, TunnelError> {
    let mut prepared = HashMap::new();
    for node in nodes.iter_mut() {
        let Some(ssh) = &node.ssh else { continue };
        let bound = forward::bind(&ssh.forwards)?;
        let local = |service: &'static str, name: &str| {
            bound
                .iter()
                .find(|b| b.spec.name == name)
                .map(|b| b.local)
                .ok_or_else(|| TunnelError::UnknownForward {
                    node: node.name.clone(),
                    service,
                    forward: name.to_string(),
                })
        };
        let mut comfy_url = None;
        if let Some(name) = node.comfyui.as_ref().and_then(|c| c.forward.clone()) {
            comfy_url = Some(local("comfyui", &name)?);
        }
        let mut langflow_url = None;
        if let Some(name) = node.langflow.as_ref().and_then(|l| l.forward.clone()) {
            langflow_url = Some(local("langflow", &name)?);
        }
        if let (Some(comfy), Some(addr)) = (node.comfyui.as_mut(), comfy_url) {
            point_at(&mut comfy.url, addr);
        }
        if let (Some(langflow), Some(addr)) = (node.langflow.as_mut(), langflow_url) {
            point_at(&mut langflow.url, addr);
        }
        prepared.insert(node.name.clone(), bound);
    }
    Ok(prepared)
}

fn point_at(url: &mut url::Url, addr: SocketAddr) {
    // An http(s) URL always has a host, so neither can fail.
    let _ = url.set_ip_host(addr.ip());
    let _ = url.set_port(Some(addr.port()));
}

impl Tunnel {
    pub fn new(
        node: String,
        config: SshConfig,
        bound: Vec<Bound>,
        gpu_node: Addr<GpuNode>,
        hub: Addr<ActivityHub>,
    ) -> Tunnel {
        let listeners = bound
            .into_iter()
            .map(|b| Listener {
                spec: Arc::new(b.spec),
                counters: Arc::new(Counters::default()),
                local: b.local,
                bound: Some(b.listener),
                listener: None,
            })
            .collect();
        let backoff = Duration::from_millis(config.timing.backoff_initial_ms);
        Tunnel {
            node,
            config,
            gpu_node,
            hub,
            listeners,
            current: watch::channel(None).0,
            pins: Arc::new(Mutex::new(HashMap::new())),
            state: LinkState::Connecting,
            since: OffsetDateTime::now_utc(),
            last_error: None,
            attempts: 0,
            reconnects: 0,
            ever_up: false,
            backoff,
            restarts: 0,
        }
    }

    fn target_name(&self) -> String {
        let target = &self.config.target;
        format!("{}@{}:{}", target.user, target.host, target.port)
    }

    fn view(&self) -> TunnelView {
        let total = |count: fn(&Counters) -> &std::sync::atomic::AtomicU64| {
            self.listeners
                .iter()
                .map(|l| count(&l.counters).load(Ordering::Relaxed))
                .sum()
        };
        TunnelView {
            node: self.node.clone(),
            target: self.target_name(),
            jump: self
                .config
                .jump
                .as_ref()
                .map(|j| format!("{}@{}:{}", j.user, j.host, j.port)),
            state: self.state,
            since: self.since,
            attempts: self.attempts,
            reconnects: self.reconnects,
            last_error: self.last_error.clone(),
            open_channels: total(|c| &c.open_channels),
            channels_opened: total(|c| &c.channels_opened),
            channel_failures: total(|c| &c.channel_failures),
            bytes_sent: total(|c| &c.bytes_sent),
            bytes_received: total(|c| &c.bytes_received),
            restarts: self.restarts,
            forwards: self
                .listeners
                .iter()
                .map(|l| ForwardView {
                    name: l.spec.name.clone(),
                    local: l.local,
                    remote: format!("{}:{}", l.spec.remote_host, l.spec.remote_port),
                    open_channels: l.counters.open_channels.load(Ordering::Relaxed),
                    channel_failures: l.counters.channel_failures.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Records a state change, tells the node and the activity stream.
    fn set_state(&mut self, state: LinkState, error: Option<String>) {
        // The very first attempt is news too, though the tunnel starts out `connecting`.
        let changed = self.state != state || self.last_error != error || self.attempts == 1;
        self.state = state;
        if error.is_some() {
            self.last_error = error.clone();
        }
        if !changed {
            return;
        }
        self.since = OffsetDateTime::now_utc();
        let up = state == LinkState::Up;
        let reason = (!up).then(|| match &error {
            Some(error) => format!("tunnel {state}: {error}"),
            None => format!("tunnel {state}"),
        });
        self.gpu_node.do_send(TunnelLink { up, reason });
        self.hub.do_send(Publish(Activity::TunnelState {
            node: self.node.clone(),
            state,
            error,
            reconnects: self.reconnects,
        }));
    }

    fn timing(&self) -> PumpTiming {
        PumpTiming {
            open: Duration::from_millis(self.config.timing.channel_open_timeout_ms),
            write: Duration::from_millis(self.config.timing.write_timeout_ms),
        }
    }

    /// Starts accepting on every forward (listeners become tokio listeners on first use).
    fn listen(&mut self, ctx: &mut Context<Self>) {
        let timing = self.timing();
        let mut loops = Vec::new();
        for listener in &mut self.listeners {
            if listener.listener.is_none() {
                let Some(bound) = listener.bound.take() else {
                    continue;
                };
                match tokio::net::TcpListener::from_std(bound) {
                    Ok(tokio_listener) => listener.listener = Some(Arc::new(tokio_listener)),
                    Err(err) => {
                        error!(node = %self.node, forward = %listener.spec.name, error = %err,
                            "cannot use the forward's listener");
                        continue;
                    }
                }
            }
            let Some(tokio_listener) = listener.listener.clone() else {
                continue;
            };
            loops.push(forward::accept_loop(
                self.node.clone(),
                tokio_listener,
                listener.spec.clone(),
                self.current.subscribe(),
                listener.counters.clone(),
                timing,
            ));
        }
        for accept in loops {
            ctx.spawn(accept.into_actor(self));
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.attempts += 1;
        self.set_state(LinkState::Connecting, None);
        info!(node = %self.node, target = %self.target_name(), attempt = self.attempts,
            "opening ssh tunnel");
        let config = self.config.clone();
        let pins = self.pins.clone();
        let addr = ctx.address();
        let generation = self.restarts;
        // A spawned task, not an actor future: the handshake never runs inside a handler.
        // An answer meant for the incarnation before a restart is dropped (see `Opened`).
        actix::spawn(async move {
            let result = session::open(&config, &pins).await;
            addr.do_send(Opened { generation, result });
        });
    }

    fn opened(&mut self, opened: Result<session::Session, TunnelError>, ctx: &mut Context<Self>) {
        let session = match opened {
            Ok(session) => session,
            Err(err) if err.is_permanent() => {
                error!(node = %self.node, target = %self.target_name(), error = %err,
                    "ssh tunnel refused; not retrying");
                self.set_state(LinkState::Failed, Some(err.to_string()));
                return;
            }
            Err(err) => {
                warn!(node = %self.node, target = %self.target_name(), error = %err,
                    "ssh tunnel could not open");
                self.set_state(LinkState::Down, Some(err.to_string()));
                self.schedule_reconnect(ctx);
                return;
            }
        };
        let live = Live {
            session: Arc::new(session),
            cancel: CancellationToken::new(),
        };
        if self.ever_up {
            self.reconnects += 1;
        }
        self.ever_up = true;
        self.backoff = Duration::from_millis(self.config.timing.backoff_initial_ms);
        self.current.send_replace(Some(live.clone()));
        info!(node = %self.node, target = %self.target_name(), reconnects = self.reconnects,
            "ssh tunnel up");
        self.last_error = None;
        self.set_state(LinkState::Up, None);
        let watch = watch_session(live, self.probe_target(), self.config.timing.clone());
        ctx.spawn(
            watch
                .into_actor(self)
                .map(|reason, act, ctx| act.lost(reason, ctx)),
        );
    }

    fn probe_target(&self) -> Option<(String, u16)> {
        self.config
            .forwards
            .first()
            .map(|f| (f.remote_host.clone(), f.remote_port))
    }

    /// Resets every forwarded connection and closes the session.
    fn drop_session(&mut self) {
        if let Some(live) = self.current.send_replace(None) {
            live.cancel.cancel();
            actix::spawn(async move { live.session.close().await });
        }
    }

    fn lost(&mut self, reason: String, ctx: &mut Context<Self>) {
        warn!(node = %self.node, target = %self.target_name(), reason = %reason,
            "ssh tunnel lost");
        self.drop_session();
        self.set_state(LinkState::Down, Some(reason));
        self.schedule_reconnect(ctx);
    }

    fn schedule_reconnect(&mut self, ctx: &mut Context<Self>) {
        let delay = jittered(self.backoff);
        let cap = Duration::from_millis(self.config.timing.backoff_cap_ms);
        self.backoff = (self.backoff * 2).min(cap);
        info!(node = %self.node, retry_in = ?delay, "ssh tunnel reconnect scheduled");
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }
}

/// Waits until the session is no longer usable and says why: closed (keepalives unanswered,
/// server gone) or a probe channel that did not open in time.
async fn watch_session(
    live: Live,
    probe: Option<(String, u16)>,
    timing: crate::config::TunnelTiming,
) -> String {
    let probe_every = Duration::from_millis(timing.probe_interval_ms.max(1));
    let open_timeout = Duration::from_millis(timing.channel_open_timeout_ms);
    let mut next_probe = tokio::time::Instant::now() + probe_every;
    loop {
        tokio::time::sleep(CLOSED_CHECK_INTERVAL).await;
        if live.session.is_closed() {
            return "ssh session closed".into();
        }
        let Some((host, port)) = probe.as_ref() else {
            continue;
        };
        if tokio::time::Instant::now() < next_probe {
            continue;
        }
        next_probe = tokio::time::Instant::now() + probe_every;
        let opened = tokio::time::timeout(open_timeout, live.session.open(host, *port, None));
        match opened.await {
            Ok(Ok(channel)) => {
                let _ = channel.close().await;
            }
            // The box answered (even "nothing listens there"): the session works.
            Ok(Err(async_ssh2_tokio::Error::SshError(russh::Error::ChannelOpenFailure(_)))) => {}
            Ok(Err(err)) => return format!("probe channel failed: {err}"),
            Err(_) => {
                return format!("probe channel did not open within {open_timeout:?}");
            }
        }
    }
}

/// Spreads reconnects of many tunnels apart: between 50% and 100% of the delay.
fn jittered(delay: Duration) -> Duration {
    let factor: f64 = rand::random_range(0.5..=1.0);
    delay.mul_f64(factor)
}

impl Actor for Tunnel {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        info!(node = %self.node, restarts = self.restarts, "tunnel started");
        self.listen(ctx);
        self.connect(ctx);
    }

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        self.drop_session();
        Running::Stop
    }
}

impl Supervised for Tunnel {
    /// The old context's futures (accept loops, session watch, a scheduled reconnect) are
    /// gone: drop the session, so no connection outlives it, and start over from a fresh
    /// backoff. Listeners, counters and pinned keys are kept; `started` connects again.
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts += 1;
        warn!(node = %self.node, restarts = self.restarts, "tunnel actor restarting");
        self.drop_session();
        self.backoff = Duration::from_millis(self.config.timing.backoff_initial_ms);
    }
}

impl Handler<GetTunnel> for Tunnel {
    type Result = MessageResult<GetTunnel>;

    fn handle(&mut self, _msg: GetTunnel, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.view())
    }
}

impl Handler<Reconnect> for Tunnel {
    type Result = ();

    fn handle(&mut self, _msg: Reconnect, ctx: &mut Self::Context) {
        info!(node = %self.node, state = %self.state, "tunnel reconnect asked");
        ctx.stop();
    }
}

impl Handler<Opened> for Tunnel {
    type Result = ();

    fn handle(&mut self, opened: Opened, ctx: &mut Self::Context) {
        if opened.generation != self.restarts {
            if let Ok(stale) = opened.result {
                actix::spawn(async move { stale.close().await });
            }
            return;
        }
        self.opened(opened.result, ctx);
    }
}
