//! Local forwarding: one listener per forward on 127.0.0.1, and for every accepted
//! connection a direct-tcpip channel pumped both ways.
//!
//! Each connection is its own task: a channel that is slow to open (bounded by
//! `channel_open_timeout_ms`) or refused by the box delays only that connection. Ends travel
//! both ways: local EOF sends channel EOF and the remote side may still answer; remote EOF
//! (or close) closes the local socket, so a pooled HTTP connection whose server hung up is
//! seen closed at once. Every write has a deadline (`write_timeout_ms`), so a dead channel
//! fails the connection instead of hanging it. When the session dies, every connection is
//! reset (`SO_LINGER` 0), so readers get an error rather than a clean end of data.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::session::Session;
use super::TunnelError;
use crate::config::ForwardConfig;

/// Bytes read per step of a pump.
const PUMP_BUFFER: usize = 64 * 1024;
/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The session connections are carried over, with the token that resets them all.
#[derive(Clone)]
pub struct Live {
    pub session: Arc<Session>,
    pub cancel: CancellationToken,
}

/// Counters over the tunnel's life (kept across sessions and actor restarts).
#[derive(Debug, Default)]
pub struct Counters {
    pub open_channels: AtomicU64,
    pub channels_opened: AtomicU64,
    pub channel_failures: AtomicU64,
    /// Bytes from local clients to the box.
    pub bytes_sent: AtomicU64,
    /// Bytes from the box to local clients.
    pub bytes_received: AtomicU64,
}

/// A forward's listener, bound when the cluster starts so services know its address.
pub struct Bound {
    pub spec: ForwardConfig,
    pub local: SocketAddr,
    pub listener: std::net::TcpListener,
}

/// Binds every forward's listener on 127.0.0.1 (port 0 picks a free one).
pub fn bind(forwards: &[ForwardConfig]) -> Result<Vec<Bound>, TunnelError> {
    forwards
        .iter()
        .map(|spec| {
            let listen = |source| TunnelError::Listen {
                forward: spec.name.clone(),
                port: spec.local_port,
                source,
            };
            let listener =
                std::net::TcpListener::bind(("127.0.0.1", spec.local_port)).map_err(listen)?;
            listener.set_nonblocking(true).map_err(listen)?;
            let local = listener.local_addr().map_err(listen)?;
            Ok(Bound {
                spec: spec.clone(),
                local,
                listener,
            })
        })
        .collect()
}

/// Deadlines of a forwarded connection.
#[derive(Debug, Clone, Copy)]
pub struct PumpTiming {
    pub open: Duration,
    pub write: Duration,
}

/// Accepts connections until the listener fails for good or the future is dropped; each one
/// is carried over the session current at that moment, or closed when there is none.
pub async fn accept_loop(
    node: String,
    listener: Arc<TcpListener>,
    spec: Arc<ForwardConfig>,
    current: watch::Receiver<Option<Live>>,
    counters: Arc<Counters>,
    timing: PumpTiming,
) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(node = %node, forward = %spec.name, error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let live = current.borrow().clone();
        let Some(live) = live else {
            debug!(node = %node, forward = %spec.name, "tunnel down; connection refused");
            reset(socket);
            continue;
        };
        let carry = carry(socket, peer, live, spec.clone(), counters.clone(), timing);
        tokio::spawn(carry);
    }
}

/// Closes with a reset, so the peer sees an error instead of an orderly end.
fn reset(socket: TcpStream) {
    let _ = socket.set_zero_linger();
    drop(socket);
}

/// Decrements the open-channel count however the connection ends.
struct OpenChannel<'a>(&'a Counters);

impl Drop for OpenChannel<'_> {
    fn drop(&mut self) {
        self.0.open_channels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Opens the channel for one accepted connection and pumps it until either end is done.
async fn carry(
    socket: TcpStream,
    peer: SocketAddr,
    live: Live,
    spec: Arc<ForwardConfig>,
    counters: Arc<Counters>,
    timing: PumpTiming,
) {
    let _ = socket.set_nodelay(true);
    let open = live
        .session
        .open(&spec.remote_host, spec.remote_port, Some(peer));
    let channel = match tokio::time::timeout(timing.open, open).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(err)) => {
            counters.channel_failures.fetch_add(1, Ordering::Relaxed);
            warn!(forward = %spec.name, remote_port = spec.remote_port, error = %err,
                "channel refused");
            reset(socket);
            return;
        }
        Err(_) => {
            counters.channel_failures.fetch_add(1, Ordering::Relaxed);
            warn!(forward = %spec.name, remote_port = spec.remote_port,
                timeout = ?timing.open, "channel did not open in time");
            reset(socket);
            return;
        }
    };
    counters.channels_opened.fetch_add(1, Ordering::Relaxed);
    counters.open_channels.fetch_add(1, Ordering::Relaxed);
    let _open = OpenChannel(&counters);
    let stream = channel.into_stream();
    let (mut local_read, mut local_write) = socket.into_split();
    let (mut remote_read, mut remote_write) = tokio::io::split(stream);
    // In a block of its own, so the pumps' borrows of the halves end with it.
    let outcome = {
        let up = copy(
            &mut local_read,
            &mut remote_write,
            timing.write,
            &counters.bytes_sent,
        );
        let down = copy(
            &mut remote_read,
            &mut local_write,
            timing.write,
            &counters.bytes_received,
        );
        tokio::pin!(up, down);
        tokio::select! {
            _ = live.cancel.cancelled() => Ended::SessionLost,
            // The box is done sending (or failed): the local socket closes now.
            result = &mut down => Ended::from(result),
            // The client is done sending: its EOF went on as channel EOF; the answer may still
            // be coming.
            result = &mut up => match result {
                Ok(()) => tokio::select! {
                    _ = live.cancel.cancelled() => Ended::SessionLost,
                    result = &mut down => Ended::from(result),
                },
                Err(err) => Ended::Failed(err),
            },
        }
    };
    match outcome {
        Ended::Done => debug!(forward = %spec.name, %peer, "connection closed"),
        Ended::Failed(err) => debug!(forward = %spec.name, %peer, error = %err,
            "connection failed"),
        Ended::SessionLost => {
            debug!(forward = %spec.name, %peer, "session lost; connection reset");
            // Reset rather than close, so the local reader sees an error.
            let _ = local_write.as_ref().set_zero_linger();
        }
    }
    // Dropping the halves closes the local socket and the channel (ChannelStream closes its
    // channel on drop).
}

enum Ended {
    Done,
    Failed(std::io::Error),
    SessionLost,
}

impl From<std::io::Result<()>> for Ended {
    fn from(result: std::io::Result<()>) -> Ended {
        match result {
            Ok(()) => Ended::Done,
            Err(err) => Ended::Failed(err),
        }
    }
}

/// Copies until EOF, then shuts the writer down (EOF onwards). Every write is bounded by
/// `deadline`.
async fn copy<R, W>(
    mut from: R,
    mut to: W,
    deadline: Duration,
    moved: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "write deadline passed");
    let mut buffer = vec![0u8; PUMP_BUFFER];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            tokio::time::timeout(deadline, to.shutdown())
                .await
                .map_err(|_| timed_out())??;
            return Ok(());
        }
        tokio::time::timeout(deadline, to.write_all(&buffer[..read]))
            .await
            .map_err(|_| timed_out())??;
        moved.fetch_add(read as u64, Ordering::Relaxed);
    }
}
