//! What can go wrong with a tunnel, each error naming the host (and key, port or file).

use std::path::PathBuf;

/// Why a tunnel could not be opened or kept, or a forward could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "host key of {host} is not in {}: the server offered {fingerprint} \
         (add it to known_hosts after checking it, or set accept_unknown_host_keys)",
        known_hosts.display()
    )]
    HostKeyUnknown {
        host: String,
        fingerprint: String,
        known_hosts: PathBuf,
    },
    #[error(
        "host key of {host} has changed: the server offered {fingerprint}, which does not \
         match line {line} of {} (possible man-in-the-middle; refusing to connect)",
        known_hosts.display()
    )]
    HostKeyChanged {
        host: String,
        fingerprint: String,
        known_hosts: PathBuf,
        line: usize,
    },
    #[error("host key of {host} changed from the pinned {pinned} to {fingerprint}")]
    PinnedKeyChanged {
        host: String,
        pinned: String,
        fingerprint: String,
    },
    #[error("{user}@{host} refused the key {}", key_file.display())]
    AuthRefused {
        host: String,
        user: String,
        key_file: PathBuf,
    },
    #[error("cannot load the key {} (bad format or passphrase): {source}", key_file.display())]
    KeyUnusable {
        key_file: PathBuf,
        #[source]
        source: russh::keys::Error,
    },
    #[error("cannot reach {host}: {source}")]
    Connect {
        host: String,
        #[source]
        source: async_ssh2_tokio::Error,
    },
    #[error("{host} did not complete the SSH handshake within {timeout_ms} ms")]
    ConnectTimeout { host: String, timeout_ms: u64 },
    #[error("cannot listen on 127.0.0.1:{port} for forward {forward}: {source}")]
    Listen {
        forward: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node}: service {service} names forward {forward:?}, which [nodes.ssh] lacks")]
    UnknownForward {
        node: String,
        service: &'static str,
        forward: String,
    },
}

impl TunnelError {
    /// Errors that trying again cannot fix: the tunnel stays failed with the reason instead
    /// of hammering a server that said no (or one that may be an impostor).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            TunnelError::HostKeyUnknown { .. }
                | TunnelError::HostKeyChanged { .. }
                | TunnelError::PinnedKeyChanged { .. }
                | TunnelError::AuthRefused { .. }
                | TunnelError::KeyUnusable { .. }
                | TunnelError::Listen { .. }
                | TunnelError::UnknownForward { .. }
        )
    }
}
