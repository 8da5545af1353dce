//! Host key verification: what known_hosts says of the key a server offers, and a probe
//! that learns that key so a refusal can name its fingerprint.
//!
//! async-ssh2-tokio checks known_hosts itself but only answers yes or no. When it says no,
//! [`probe`] opens a second handshake with a russh handler that records the offered key and
//! refuses it (nothing is authenticated or sent), and [`verdict`] tells an unknown host from
//! a changed key, as OpenSSH does.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_ssh2_tokio::Client;
use russh::keys::{HashAlg, PublicKey};

/// What known_hosts says of a key offered by `host:port`.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Listed for this host.
    Known,
    /// No key of this algorithm is listed for this host.
    Unknown,
    /// Another key of the same algorithm is listed for this host, on this line.
    Changed { line: usize },
}

/// Looks the key up in `known_hosts` (a missing file lists nothing). Ports other than 22
/// are matched as `[host]:port`, the way OpenSSH writes them.
pub fn verdict(host: &str, port: u16, key: &PublicKey, known_hosts: &Path) -> Verdict {
    match russh::keys::check_known_hosts_path(host, port, key, known_hosts) {
        Ok(true) => Verdict::Known,
        Ok(false) => Verdict::Unknown,
        Err(russh::keys::Error::KeyChanged { line }) => Verdict::Changed { line },
        // An unreadable or malformed file vouches for nothing.
        Err(_) => Verdict::Unknown,
    }
}

/// `SHA256:<base64>`, as `ssh-keygen -l` and OpenSSH's warnings print it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The key in the base64 form async-ssh2-tokio pins (`ServerCheckMethod::PublicKey`).
pub fn pin_form(key: &PublicKey) -> Option<String> {
    let line = key.to_openssh().ok()?;
    line.split_whitespace().nth(1).map(str::to_string)
}

/// Where a probe connects: straight to an address, or through a jump session.
pub enum Route<'a> {
    Direct(&'a str, u16),
    Via(&'a Client, &'a str, u16),
}

/// Records the key the server offers, then refuses it.
struct Recorder {
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl russh::client::Handler for Recorder {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        // Held for one assignment, never across an await.
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(key.clone());
        }
        Ok(false)
    }
}

/// The host key the server on `route` offers, or `None` when it could not be learned
/// (unreachable, no handshake within `timeout`).
pub async fn probe(route: Route<'_>, timeout: Duration) -> Option<PublicKey> {
    let seen = Arc::new(Mutex::new(None));
    let handler = Recorder { seen: seen.clone() };
    let config = Arc::new(russh::client::Config::default());
    let attempt = async {
        match route {
            Route::Direct(host, port) => {
                let _ = russh::client::connect(config, (host, port), handler).await;
            }
            Route::Via(jump, host, port) => {
                let Ok(channel) = jump.open_direct_tcpip_channel((host, port), None).await else {
                    return;
                };
                let _ = russh::client::connect_stream(config, channel.into_stream(), handler).await;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, attempt).await;
    let key = seen.lock().ok()?.take();
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDNzlfr4kmEbYO46IDn7AWEf073ZORNgEB0783HIbNHO";
    const OTHER: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaUmt0Bn0jVsKFVc2a6gtIXz94AWirw6Xuf+MMU8F2r";

    fn key(text: &str) -> PublicKey {
        PublicKey::from_openssh(text).expect("the test key parses")
    }

    #[test]
    fn known_unknown_and_changed_keys_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, format!("# comment\n[127.0.0.1]:2222 {KEY}\n")).unwrap();

        assert_eq!(verdict("127.0.0.1", 2222, &key(KEY), &path), Verdict::Known);
        assert_eq!(
            verdict("127.0.0.1", 2222, &key(OTHER), &path),
            Verdict::Changed { line: 1 }
        );
        // Another port is another host to OpenSSH.
        assert_eq!(
            verdict("127.0.0.1", 2223, &key(KEY), &path),
            Verdict::Unknown
        );
        let missing = dir.path().join("missing");
        assert_eq!(
            verdict("127.0.0.1", 2222, &key(KEY), &missing),
            Verdict::Unknown
        );
    }

    #[test]
    fn fingerprints_use_the_openssh_sha256_form() {
        let printed = fingerprint(&key(KEY));
        assert!(printed.starts_with("SHA256:"), "{printed}");
        assert_eq!(printed.len(), "SHA256:".len() + 43, "{printed}");
        assert_eq!(pin_form(&key(KEY)).as_deref(), KEY.split(' ').nth(1));
    }
}
