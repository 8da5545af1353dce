//! Who may do what: bearer tokens, each with a [`Role`], read from the environment.
//!
//! `[daemon] tokens` names the environment variable holding each token, never the token
//! itself, so a config file can be committed and shared. A daemon with no tokens is open
//! (everyone is an operator), which is only allowed on loopback unless `allow_open` says
//! otherwise: see [`check_exposure`].
//!
//! Tokens are kept as SHA-256 digests and a presented token is compared, digest to digest,
//! against every configured one in constant time, so neither the time an answer takes nor
//! the daemon's memory tells an attacker how much of a guess was right. Nothing here
//! implements `Debug` or `Display` with a secret in it.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::bail;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token lets its holder do. Ordered: an operator can do everything a viewer can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read: GET routes, artifacts, the WebSocket's activity, MCP read-only tools and
    /// resources.
    Viewer,
    /// Everything: submit, cancel, leases.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[daemon] tokens` entry as written: `{ env = "VAR", role = "viewer" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// The environment variable holding the token.
    pub env: String,
    pub role: Role,
}

/// Whom a request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The environment variable the matching token came from (not a secret: it names which
    /// token was used in logs); `None` on an open daemon.
    pub token: Option<String>,
}

impl Caller {
    /// Everyone on a daemon without tokens.
    pub fn open() -> Caller {
        Caller {
            role: Role::Operator,
            token: None,
        }
    }

    pub fn may(&self, needed: Role) -> bool {
        self.role >= needed
    }
}

struct Token {
    digest: [u8; 32],
    role: Role,
    env: String,
}

/// The daemon's tokens; empty means open.
#[derive(Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

impl Tokens {
    /// Reads every named variable through `lookup` (the process environment in the daemon,
    /// a map in tests). An unset or empty variable is an error naming it, as is one token
    /// given two roles.
    pub fn load(
        specs: &[TokenSpec],
        lookup: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Tokens> {
        let mut tokens: Vec<Token> = Vec::new();
        for spec in specs {
            let var = spec.env.trim();
            if var.is_empty() {
                bail!("[daemon] tokens: an entry has an empty `env`; name the variable");
            }
            let secret = lookup(var).unwrap_or_default();
            if secret.trim().is_empty() {
                bail!(
                    "[daemon] tokens names {var} (role {}), which is not set or empty; \
                     export it, or remove the entry",
                    spec.role
                );
            }
            let digest = digest(&secret);
            if let Some(twin) = tokens.iter().find(|t| bool::from(t.digest.ct_eq(&digest))) {
                if twin.role != spec.role {
                    bail!(
                        "[daemon] tokens: {} and {var} hold the same token with different \
                         roles; give each role its own token",
                        twin.env
                    );
                }
            }
            tokens.push(Token {
                digest,
                role: spec.role,
                env: var.to_string(),
            });
        }
        Ok(Tokens { tokens })
    }

    /// True when no token is configured: every request is an operator's.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The caller a presented token belongs to, if any. Every configured token is compared
    /// (no early exit), each in constant time.
    pub fn check(&self, presented: &str) -> Option<Caller> {
        let digest = digest(presented);
        let mut found: Option<&Token> = None;
        for token in &self.tokens {
            if bool::from(token.digest.ct_eq(&digest)) && found.is_none() {
                found = Some(token);
            }
        }
        found.map(|token| Caller {
            role: token.role,
            token: Some(token.env.clone()),
        })
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<(&str, Role)> = self
            .tokens
            .iter()
            .map(|t| (t.env.as_str(), t.role))
            .collect();
        f.debug_struct("Tokens").field("from", &names).finish()
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Refuses to serve an open daemon (no tokens) on an address other machines can reach,
/// unless `allow_open` says so. Every address `bind` resolves to must be loopback; a name
/// that does not resolve is left for the bind itself to report.
pub fn check_exposure(bind: &str, tokens: &Tokens, allow_open: bool) -> anyhow::Result<()> {
    if !tokens.is_open() || allow_open {
        return Ok(());
    }
    let Ok(addrs) = bind.to_socket_addrs() else {
        return Ok(());
    };
    let exposed: Vec<SocketAddr> = addrs.filter(|addr| !addr.ip().is_loopback()).collect();
    if let Some(addr) = exposed.first() {
        bail!(
            "refusing to listen on {bind} ({addr} is not a loopback address) with no \
             [daemon] tokens: anyone who can reach it could run and cancel workflows. \
             Configure tokens (docs/api.md, Authentication), or set [daemon] allow_open = \
             true / pass --allow-open to serve it open on purpose"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn spec(env: &str, role: Role) -> TokenSpec {
        TokenSpec {
            env: env.into(),
            role,
        }
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn tokens_resolve_to_their_roles() {
        let specs = [spec("OP", Role::Operator), spec("VIEW", Role::Viewer)];
        let tokens = Tokens::load(&specs, env(&[("OP", "op-secret"), ("VIEW", "v-secret")]))
            .expect("both variables are set");
        assert!(!tokens.is_open());
        let op = tokens
            .check("op-secret")
            .expect("the operator token is known");
        assert_eq!(op.role, Role::Operator);
        assert_eq!(op.token.as_deref(), Some("OP"));
        assert_eq!(tokens.check("v-secret").map(|c| c.role), Some(Role::Viewer));
        assert_eq!(tokens.check("op-secre"), None);
        assert_eq!(tokens.check(""), None);
        let debug = format!("{tokens:?}");
        assert!(!debug.contains("secret"), "Debug shows no secret: {debug}");
    }

    #[test]
    fn unset_or_empty_variables_are_named() {
        for lookup in [env(&[]), env(&[("MISSING_TOKEN", "  ")])] {
            let err =
                Tokens::load(&[spec("MISSING_TOKEN", Role::Viewer)], lookup).expect_err("refused");
            let text = format!("{err:#}");
            assert!(
                text.contains("MISSING_TOKEN") && text.contains("not set or empty"),
                "{text}"
            );
        }
    }

    #[test]
    fn one_token_cannot_hold_two_roles() {
        let specs = [spec("A", Role::Operator), spec("B", Role::Viewer)];
        let err = Tokens::load(&specs, env(&[("A", "same"), ("B", "same")])).expect_err("refused");
        let text = format!("{err:#}");
        assert!(text.contains("A and B"), "{text}");
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Caller::open().may(Role::Operator));
        let viewer = Caller {
            role: Role::Viewer,
            token: None,
        };
        assert!(viewer.may(Role::Viewer) && !viewer.may(Role::Operator));
    }

    #[test]
    fn an_open_daemon_stays_on_loopback_unless_allowed() {
        let open = Tokens::default();
        check_exposure("127.0.0.1:0", &open, false).expect("loopback is fine");
        check_exposure("[::1]:0", &open, false).expect("loopback is fine");
        let err = check_exposure("0.0.0.0:7700", &open, false).expect_err("refused");
        let text = format!("{err:#}");
        assert!(
            text.contains("0.0.0.0:7700") && text.contains("allow_open"),
            "{text}"
        );
        check_exposure("0.0.0.0:7700", &open, true).expect("allowed on purpose");
        let tokens = Tokens::load(&[spec("T", Role::Viewer)], env(&[("T", "t")])).unwrap();
        check_exposure("0.0.0.0:7700", &tokens, false).expect("tokens guard it");
    }
}
