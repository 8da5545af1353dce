//! Opening an SSH session to a box (through a jump host when configured), with the host key
//! checked against known_hosts and the daemon's key, and keepalives set from the timings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_ssh2_tokio::{AuthMethod, Client, ServerCheckMethod};
use russh::client::Msg;
use russh::keys::PublicKey;
use russh::Channel;
use tracing::{info, warn};

use super::hostkey::{self, Route, Verdict};
use super::TunnelError;
use crate::config::{SshConfig, SshHop, TunnelTiming};

/// Host keys accepted under `accept_unknown_host_keys`, by `host:port`: later sessions of
/// the same tunnel insist on exactly that key.
pub type Pins = Arc<Mutex<HashMap<String, PublicKey>>>;

/// A live SSH session, with the jump session it runs through (kept open as long as it).
pub struct Session {
    client: Client,
    jump: Option<Client>,
}

impl Session {
    /// Either session ended: a keepalive went unanswered, the server closed, the TCP
    /// connection broke.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed() || self.jump.as_ref().is_some_and(Client::is_closed)
    }

    /// Opens a direct-tcpip channel to `host:port` as seen from the box.
    pub async fn open(
        &self,
        host: &str,
        port: u16,
        originator: Option<SocketAddr>,
    ) -> Result<Channel<Msg>, async_ssh2_tokio::Error> {
        self.client
            .open_direct_tcpip_channel((host, port), originator)
            .await
    }

    /// Says goodbye to the server(s); errors are moot, the session is being dropped.
    pub async fn close(&self) {
        let _ = self.client.disconnect().await;
        if let Some(jump) = &self.jump {
            let _ = jump.disconnect().await;
        }
    }
}

/// russh settings for one hop: keepalives declare a silent server dead after
/// `keepalive_interval * keepalive_max`.
fn ssh_settings(timing: &TunnelTiming) -> async_ssh2_tokio::Config {
    async_ssh2_tokio::Config {
        keepalive_interval: Some(Duration::from_millis(timing.keepalive_interval_ms.max(1))),
        keepalive_max: timing.keepalive_max.max(1),
        nodelay: true,
        ..Default::default()
    }
}

/// `host:port` as errors and pins name a hop.
pub fn hop_name(hop: &SshHop) -> String {
    format!("{}:{}", hop.host, hop.port)
}

/// Opens the session, within the configured connect timeout (per hop).
pub async fn open(config: &SshConfig, pins: &Pins) -> Result<Session, TunnelError> {
    let timing = &config.timing;
    let jump = match &config.jump {
        Some(hop) => Some(connect_hop(hop, None, timing, pins).await?),
        None => None,
    };
    let client = connect_hop(&config.target, jump.as_ref(), timing, pins).await?;
    Ok(Session { client, jump })
}

/// One hop: connect, check the host key, authenticate.
async fn connect_hop(
    hop: &SshHop,
    via: Option<&Client>,
    timing: &TunnelTiming,
    pins: &Pins,
) -> Result<Client, TunnelError> {
    match attempt(hop, via, timing, pins).await {
        Err(Refusal::HostKey(original)) => {
            let key = learn_key(hop, via, timing).await;
            let Some(key) = key else {
                return Err(TunnelError::Connect {
                    host: hop_name(hop),
                    source: original,
                });
            };
            judge_key(hop, key, original, pins)?;
            // Accepted under the opt-in and pinned: connect again insisting on that key.
            attempt(hop, via, timing, pins)
                .await
                .map_err(|refusal| match refusal {
                    Refusal::HostKey(source) => TunnelError::Connect {
                        host: hop_name(hop),
                        source,
                    },
                    Refusal::Other(err) => err,
                })
        }
        Err(Refusal::Other(err)) => Err(err),
        Ok(client) => Ok(client),
    }
}

/// Why one connection attempt failed: the host key check said no, or anything else.
enum Refusal {
    HostKey(async_ssh2_tokio::Error),
    Other(TunnelError),
}

async fn attempt(
    hop: &SshHop,
    via: Option<&Client>,
    timing: &TunnelTiming,
    pins: &Pins,
) -> Result<Client, Refusal> {
    let name = hop_name(hop);
    let pinned = pins.lock().ok().and_then(|pins| pins.get(&name).cloned());
    let check = match pinned.as_ref().and_then(hostkey::pin_form) {
        Some(base64) => ServerCheckMethod::PublicKey(base64),
        None => ServerCheckMethod::KnownHostsFile(hop.known_hosts.to_string_lossy().into()),
    };
    let auth = AuthMethod::with_key_file(&hop.key_file, hop.key_passphrase.as_deref());
    let address = (hop.host.clone(), hop.port);
    let settings = ssh_settings(timing);
    let connect = async {
        match via {
            Some(jump) => {
                Client::connect_via_with_config(jump, address, &hop.user, auth, check, settings)
                    .await
            }
            None => Client::connect_with_config(address, &hop.user, auth, check, settings).await,
        }
    };
    let timeout = Duration::from_millis(timing.connect_timeout_ms);
    let result = tokio::time::timeout(timeout, connect).await.map_err(|_| {
        Refusal::Other(TunnelError::ConnectTimeout {
            host: name.clone(),
            timeout_ms: timing.connect_timeout_ms,
        })
    })?;
    use async_ssh2_tokio::Error as E;
    result.map_err(|err| match err {
        E::ServerCheckFailed | E::SshError(russh::Error::UnknownKey) => Refusal::HostKey(err),
        E::KeyAuthFailed => Refusal::Other(TunnelError::AuthRefused {
            host: name.clone(),
            user: hop.user.clone(),
            key_file: hop.key_file.clone(),
        }),
        E::KeyInvalid(source) => Refusal::Other(TunnelError::KeyUnusable {
            key_file: hop.key_file.clone(),
            source,
        }),
        other => Refusal::Other(TunnelError::Connect {
            host: name.clone(),
            source: other,
        }),
    })
}

/// The key the hop offers, learned by a handshake that authenticates nothing.
async fn learn_key(hop: &SshHop, via: Option<&Client>, timing: &TunnelTiming) -> Option<PublicKey> {
    let route = match via {
        Some(jump) => Route::Via(jump, &hop.host, hop.port),
        None => Route::Direct(&hop.host, hop.port),
    };
    hostkey::probe(route, Duration::from_millis(timing.connect_timeout_ms)).await
}

/// Decides on a key the session refused: a changed key always fails; an unknown one fails
/// unless the hop opts in, and is then pinned (and logged with its fingerprint).
fn judge_key(
    hop: &SshHop,
    key: PublicKey,
    original: async_ssh2_tokio::Error,
    pins: &Pins,
) -> Result<(), TunnelError> {
    let host = hop_name(hop);
    let fingerprint = hostkey::fingerprint(&key);
    let pinned = pins.lock().ok().and_then(|pins| pins.get(&host).cloned());
    if let Some(pinned) = pinned {
        return Err(TunnelError::PinnedKeyChanged {
            host,
            pinned: hostkey::fingerprint(&pinned),
            fingerprint,
        });
    }
    match hostkey::verdict(&hop.host, hop.port, &key, &hop.known_hosts) {
        Verdict::Changed { line } => Err(TunnelError::HostKeyChanged {
            host,
            fingerprint,
            known_hosts: hop.known_hosts.clone(),
            line,
        }),
        Verdict::Unknown if hop.accept_unknown_host_keys => {
            warn!(host = %host, fingerprint = %fingerprint,
                "accepting a host key known_hosts does not list (accept_unknown_host_keys)");
            if let Ok(mut pins) = pins.lock() {
                pins.insert(host, key);
            }
            Ok(())
        }
        Verdict::Unknown => Err(TunnelError::HostKeyUnknown {
            host,
            fingerprint,
            known_hosts: hop.known_hosts.clone(),
        }),
        // Listed after all (the file changed, or the server did between the handshakes):
        // an ordinary failure, tried again.
        Verdict::Known => {
            info!(host = %host, "host key refused, then found in known_hosts; will retry");
            Err(TunnelError::Connect {
                host,
                source: original,
            })
        }
    }
}
