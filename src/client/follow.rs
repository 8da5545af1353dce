//! Following one run live: the WebSocket for promptness, REST for truth.
//!
//! The event stream is only a fast path. Every (re)connection subscribes with `since` = the
//! last sequence number seen, so the daemon can replay what was missed, and then takes a
//! REST snapshot, so whatever fell outside the daemon's replay window (or happened while the
//! daemon itself restarted) still shows. A `missed` frame (we were too slow and the daemon
//! dropped events for us) triggers the same refetch. When the socket cannot be opened at all
//! (an old daemon, a proxy that refuses upgrades), the follower polls REST and keeps trying
//! the socket with backoff. The run is over when either source says so; the answer is always
//! a final REST fetch, never an assembled guess.
//!
//! awc's client is not `Send`, so [`follow_run`] must be polled on an actix system (inside
//! `#[actix_web::main]` or `actix_rt::System::new().block_on`).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use awc::ws::{Frame, Message};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};

use super::progress::{StepDisplay, Tracker};
use super::view;
use super::{DaemonClient, DaemonError};

/// Largest WebSocket frame accepted; step previews carry base64 images that exceed awc's
/// 64 KiB default.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Timings of the follow loop; the defaults suit a person at a terminal, tests shrink them.
#[derive(Clone, Debug)]
pub(crate) struct FollowOptions {
    /// Time allowed for the WebSocket handshake.
    pub connect_timeout: Duration,
    /// How often to send `{"type":"ping"}` on a quiet socket.
    pub ping_every: Duration,
    /// A socket silent for this long (no event, no pong) is treated as dropped: a half-open
    /// TCP connection otherwise looks exactly like a run with nothing to report.
    pub idle_timeout: Duration,
    /// First and longest wait between reconnection attempts (doubling in between); each wait
    /// is preceded by a REST poll, so this is also the polling interval of the fallback.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long the daemon may stay unreachable before following gives up. Long enough to
    /// ride out a daemon restart or a tunnel reconnect.
    pub give_up_after: Duration,
}

impl Default for FollowOptions {
    fn default() -> FollowOptions {
        FollowOptions {
            connect_timeout: Duration::from_secs(5),
            ping_every: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(5),
            give_up_after: Duration::from_secs(120),
        }
    }
}

/// Follows a run over the WebSocket, drawing one progress bar per step (queued -> placed on a
/// node -> progress -> done, or failed with the error) on stderr, or one plain line per step
/// transition when stderr is not a terminal. Returns the final run view, fetched over REST
/// once the run ended.
///
/// A dropped socket is reopened with `since` = the last sequence number seen; while it cannot
/// be opened the run is polled over REST. Gives up with an error when the daemon stays
/// unreachable for two minutes, or at once when it does not know the run.
///
/// Must run on an actix system: see the module doc.
pub async fn follow_run(client: &DaemonClient, run_id: &str) -> anyhow::Result<Value> {
    let mut display = StepDisplay::stderr();
    follow_run_with(client, run_id, &FollowOptions::default(), &mut display).await
}

/// [`follow_run`] with explicit timings and display.
pub(crate) async fn follow_run_with(
    client: &DaemonClient,
    run_id: &str,
    options: &FollowOptions,
    display: &mut StepDisplay,
) -> anyhow::Result<Value> {
    let mut follower = Follower {
        client,
        run_id,
        options,
        display,
        tracker: Tracker::new(run_id),
        last_seq: None,
        unreachable_since: None,
    };
    let result = follower.follow().await;
    follower.display.finish();
    result
}

/// The state of one follow.
struct Follower<'a> {
    client: &'a DaemonClient,
    run_id: &'a str,
    options: &'a FollowOptions,
    display: &'a mut StepDisplay,
    tracker: Tracker,
    /// Sequence number of the newest event applied; sent as `since` when resubscribing.
    last_seq: Option<u64>,
    /// When the daemon was first found unreachable in the current outage.
    unreachable_since: Option<Instant>,
}

/// How a WebSocket session ended.
enum Session {
    /// The run reached a final state.
    RunEnded,
    /// The socket closed, failed or went silent after it was open.
    Dropped,
    /// The socket could not be opened.
    Unavailable,
}

/// Whether to keep reading the socket after handling a frame.
#[derive(PartialEq)]
enum Flow {
    Continue,
    RunEnded,
    /// The daemon went away under the socket (REST failed transiently): reconnect.
    Reconnect,
}

impl Follower<'_> {
    async fn follow(&mut self) -> anyhow::Result<Value> {
        let mut backoff = self.options.retry_min;
        loop {
            match self.session().await? {
                Session::RunEnded => break,
                Session::Dropped => backoff = self.options.retry_min,
                Session::Unavailable => {}
            }
            // Between socket attempts, REST keeps the display honest (and is the whole
            // story when the socket never opens).
            if self.refresh().await? == Flow::RunEnded {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.options.retry_max);
        }

        // The answer comes from REST even when the socket announced the end, so it holds
        // every step's artifacts and timings. Retried like any poll in case the daemon
        // vanished right after the run ended.
        loop {
            match self.client.run(self.run_id).await {
                Ok(run) => {
                    let changes = self.tracker.snapshot(&run);
                    self.display.show(&changes);
                    return Ok(run);
                }
                // Tolerated (the daemon is briefly away): wait a little and try again.
                Err(err) => self.tolerate(err)?,
            }
            tokio::time::sleep(self.options.retry_min).await;
        }
    }

    /// Fetches the run over REST and shows what changed. A transient failure (daemon down)
    /// is tolerated until `give_up_after`; anything else (unknown run) ends the follow.
    async fn refresh(&mut self) -> anyhow::Result<Flow> {
        match self.client.run(self.run_id).await {
            Ok(run) => {
                self.unreachable_since = None;
                let changes = self.tracker.snapshot(&run);
                self.display.show(&changes);
                Ok(if self.tracker.ended() {
                    Flow::RunEnded
                } else {
                    Flow::Continue
                })
            }
            Err(err) => {
                self.tolerate(err)?;
                Ok(Flow::Reconnect)
            }
        }
    }

    /// Decides whether a failed REST call is a blip to wait out or the end of the follow.
    fn tolerate(&mut self, err: anyhow::Error) -> anyhow::Result<()> {
        let transient = err
            .downcast_ref::<DaemonError>()
            .is_some_and(DaemonError::is_transient);
        if !transient {
            return Err(err).with_context(|| format!("following run {}", self.run_id));
        }
        let since = *self.unreachable_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.options.give_up_after {
            let waited = self.options.give_up_after.as_secs();
            return Err(err).with_context(|| {
                format!(
                    "following run {}: gave up after {waited}s without the daemon",
                    self.run_id
                )
            });
        }
        tracing::debug!(run = self.run_id, error = %format!("{err:#}"), "daemon unavailable");
        Ok(())
    }

    /// One WebSocket connection: subscribe, snapshot, then apply events until the run ends
    /// or the socket is lost.
    async fn session(&mut self) -> anyhow::Result<Session> {
        let url = self.client.ws_url();
        let ws = awc::Client::builder()
            .timeout(self.options.connect_timeout)
            .finish();
        let mut request = ws.ws(url.as_str()).max_frame_size(MAX_FRAME_BYTES);
        if let Some(credential) = self.client.credential() {
            request = request.bearer_auth(credential.secret());
        }
        let connected = request.connect().await;
        let mut socket = match connected {
            Ok((_, socket)) => socket,
            Err(err) => {
                tracing::debug!(%url, error = %err, "cannot open the event socket; polling");
                return Ok(Session::Unavailable);
            }
        };
        tracing::debug!(%url, run = self.run_id, since = ?self.last_seq, "event socket open");

        let mut subscribe = json!({"type": "subscribe", "run_id": self.run_id});
        if let Some(seq) = self.last_seq {
            subscribe["since"] = json!(seq);
        }
        if socket
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .is_err()
        {
            return Ok(Session::Dropped);
        }

        let mut ping = tokio::time::interval(self.options.ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await; // the first tick is immediate; the socket was just opened
        let mut last_heard = Instant::now();

        loop {
            let frame = tokio::select! {
                frame = socket.next() => frame,
                _ = ping.tick() => {
                    if last_heard.elapsed() >= self.options.idle_timeout {
                        tracing::debug!(%url, "event socket silent; reconnecting");
                        return Ok(Session::Dropped);
                    }
                    let ping = Message::Text(r#"{"type":"ping"}"#.into());
                    if socket.send(ping).await.is_err() {
                        return Ok(Session::Dropped);
                    }
                    continue;
                }
            };
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(err)) => {
                    tracing::debug!(%url, error = %err, "event socket failed; reconnecting");
                    return Ok(Session::Dropped);
                }
                None => {
                    tracing::debug!(%url, "event socket ended; reconnecting");
                    return Ok(Session::Dropped);
                }
            };
            last_heard = Instant::now();

            let text = match frame {
                Frame::Text(bytes) => bytes,
                // The daemon (actix) never fragments its small JSON frames, but a proxy in
                // between may. Reassembly would need actix-http's `Item` type, which awc does
                // not re-export; a message split this way is rare enough to treat like a
                // `missed` frame: skip it and let REST fill the gap.
                Frame::Continuation(_) => {
                    tracing::debug!(%url, "skipping a fragmented message; refetching");
                    match self.refresh().await? {
                        Flow::Continue => continue,
                        Flow::RunEnded => return Ok(Session::RunEnded),
                        Flow::Reconnect => return Ok(Session::Dropped),
                    }
                }
                Frame::Ping(payload) => {
                    if socket.send(Message::Pong(payload)).await.is_err() {
                        return Ok(Session::Dropped);
                    }
                    continue;
                }
                Frame::Close(reason) => {
                    tracing::debug!(%url, ?reason, "daemon closed the event socket");
                    return Ok(Session::Dropped);
                }
                Frame::Binary(_) | Frame::Pong(_) => continue,
            };
            match self.on_text(&text).await? {
                Flow::Continue => {}
                Flow::RunEnded => return Ok(Session::RunEnded),
                Flow::Reconnect => return Ok(Session::Dropped),
            }
        }
    }

    /// Handles one JSON text frame: a reply to our commands or an activity event.
    async fn on_text(&mut self, text: &[u8]) -> anyhow::Result<Flow> {
        let Ok(frame) = serde_json::from_slice::<Value>(text) else {
            tracing::warn!(
                len = text.len(),
                "ignoring a non-JSON frame from the daemon"
            );
            return Ok(Flow::Continue);
        };
        let kind = frame
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match kind {
            "subscribed" => {
                let latest = frame.get("seq").and_then(Value::as_u64);
                // A latest seq below ours means the daemon restarted and counts afresh; keep
                // ours and every new event would look like a replay and be dropped.
                if let (Some(latest), Some(ours)) = (latest, self.last_seq) {
                    if latest < ours {
                        tracing::debug!(latest, ours, "event sequence restarted");
                        self.last_seq = Some(latest);
                    }
                }
                if self.last_seq.is_none() {
                    self.last_seq = latest;
                }
                // Subscribed first, snapshot second: nothing can slip between the two.
                self.refresh().await
            }
            "missed" => {
                let count = frame.get("count").and_then(Value::as_u64);
                tracing::debug!(
                    ?count,
                    run = self.run_id,
                    "daemon dropped events; refetching"
                );
                self.refresh().await
            }
            "error" => {
                // Read through `view` so control characters arrive escaped on stderr.
                let message = view::cell(&frame, "message");
                let code = view::cell(&frame, "error");
                tracing::warn!(%code, %message, run = self.run_id, "daemon refused a command");
                // REST tells whether the run exists; an unknown run ends the follow there.
                self.refresh().await
            }
            "pong" | "submitted" | "cancelled" => Ok(Flow::Continue),
            _ => Ok(self.on_event(&frame)),
        }
    }

    /// Applies an activity event, skipping any already seen (replays overlap).
    fn on_event(&mut self, event: &Value) -> Flow {
        if let Some(seq) = event.get("seq").and_then(Value::as_u64) {
            if self.last_seq.is_some_and(|last| seq <= last) {
                return Flow::Continue;
            }
            self.last_seq = Some(seq);
        }
        let changes = self.tracker.event(event);
        self.display.show(&changes);
        if self.tracker.ended() {
            Flow::RunEnded
        } else {
            Flow::Continue
        }
    }
}
