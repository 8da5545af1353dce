//! Browser guards for the REST API and `/ws`: which pages may talk to the daemon, and under
//! which host names it answers.
//!
//! A web page the operator happens to visit can reach a daemon on their machine: browsers
//! apply no CORS to WebSockets, so any page could open `ws://127.0.0.1:7700/ws`, watch every
//! run and submit its own; and a page whose name resolves to 127.0.0.1 after loading (DNS
//! rebinding) is same-origin with the daemon for the browser. Two checks close both:
//!
//! - **Origin.** A request that names an `Origin` (browsers send it on every WebSocket
//!   upgrade and every cross-origin or non-GET request) must come from a loopback page, from
//!   a page the daemon serves itself (the origin's host and port are the request's `Host`),
//!   or from an origin in `[daemon] allowed_origins`. Other clients send no Origin and pass.
//! - **Host.** A daemon without tokens answers only under loopback names, IP literals (a
//!   rebinding page always uses a name) and `[daemon] allowed_hosts`. With tokens, a page
//!   under a rebound name still has no token to send, so any Host is served.
//!
//! `/mcp` is guarded by rmcp with the same lists (see [`crate::mcp::http_service`]).

use std::net::IpAddr;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, Error};
use tracing::info;

use super::ApiError;

/// Origins every daemon accepts: pages served from this machine, on any port.
pub const LOOPBACK_ORIGINS: [&str; 6] = [
    "http://localhost:*",
    "http://127.0.0.1:*",
    "http://[::1]:*",
    "https://localhost:*",
    "https://127.0.0.1:*",
    "https://[::1]:*",
];

/// Host names every daemon answers under.
pub const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// What the guard accepts, built once from `[daemon]`.
#[derive(Debug, Clone)]
pub struct BrowserPolicy {
    /// Loopback origins and `allowed_origins`; an entry ending in `:*` takes any port.
    origins: Vec<String>,
    /// Loopback names and `allowed_hosts`, compared without the port.
    hosts: Vec<String>,
    /// A daemon with tokens serves any Host (see the module doc).
    check_host: bool,
}

impl BrowserPolicy {
    pub fn new(allowed_origins: &[String], allowed_hosts: &[String], open: bool) -> Self {
        let origin = |o: &String| o.strip_suffix('/').unwrap_or(o).to_ascii_lowercase();
        BrowserPolicy {
            origins: LOOPBACK_ORIGINS
                .iter()
                .map(|origin| origin.to_string())
                .chain(allowed_origins.iter().map(origin))
                .collect(),
            // An entry may name a port; names are compared without one.
            hosts: LOOPBACK_HOSTS
                .iter()
                .map(|host| host.to_string())
                .chain(allowed_hosts.iter().filter_map(|h| host_name(h)))
                .map(|host| {
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string()
                })
                .collect(),
            check_host: open,
        }
    }

    /// Why a request with these headers is refused, or `None` when it may go on. Every
    /// `Origin` header counts (a request may repeat it); one that is not text is refused.
    fn refusal(&self, origins: &[Option<&str>], host: Option<&str>) -> Option<String> {
        // No Host at all is no browser (they always send one): an HTTP/1.0 probe, say.
        if let (true, Some(shown)) = (self.check_host, host) {
            let name = host_name(shown);
            if !name.as_deref().is_some_and(|name| self.host_allowed(name)) {
                return Some(format!(
                    "this daemon does not answer under the host name {shown:?}; list it in \
                     [daemon] allowed_hosts, or configure tokens"
                ));
            }
        }
        let host = host.map(str::to_ascii_lowercase);
        for origin in origins {
            let Some(origin) = origin.map(str::to_ascii_lowercase) else {
                return Some("an Origin header that is not plain text is refused".into());
            };
            let same_origin = host
                .as_deref()
                .is_some_and(|h| origin_authority(&origin) == Some(h));
            let listed = self
                .origins
                .iter()
                .any(|allowed| origin_matches(allowed, &origin));
            if !same_origin && !listed {
                return Some(format!(
                    "requests from pages at {origin} are refused; list the origin in [daemon] \
                     allowed_origins to allow them"
                ));
            }
        }
        None
    }

    fn host_allowed(&self, name: &str) -> bool {
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>().is_ok() || self.hosts.iter().any(|host| host == bare)
    }
}

/// The host of a `Host` header, lowercased, without its port (`[::1]:7700` -> `[::1]`);
/// `None` when it is not `name[:port]` or `[address][:port]`.
fn host_name(host: &str) -> Option<String> {
    let host = host.trim().to_ascii_lowercase();
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => {
            let (address, after) = rest.split_once(']')?;
            (
                format!("[{address}]"),
                after.strip_prefix(':').map(str::to_string),
            )
        }
        None => match host.rsplit_once(':') {
            Some((name, port)) => (name.to_string(), Some(port.to_string())),
            None => (host.clone(), None),
        },
    };
    let bracketed_junk = host.starts_with('[') && !host.ends_with(']') && port.is_none();
    let bad_port = port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()));
    let bad_name = name.is_empty() || name.contains(['/', '@', '[', ']']) && !name.starts_with('[');
    (!bracketed_junk && !bad_port && !bad_name).then_some(name)
}

/// `host[:port]` of an origin such as `http://localhost:5173`.
fn origin_authority(origin: &str) -> Option<&str> {
    origin.split_once("://").map(|(_, authority)| authority)
}

/// Whether `origin` is `allowed` (both lowercase), where an `allowed` ending in `:*` takes
/// any port.
fn origin_matches(allowed: &str, origin: &str) -> bool {
    match allowed.strip_suffix(":*") {
        Some(prefix) => {
            let port = origin
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix(':'));
            origin == prefix
                || port.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        }
        None => allowed == origin,
    }
}

/// The middleware: refuses with 403 `forbidden` what [`BrowserPolicy`] does not accept.
pub async fn guard(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let path = request.path();
    let mcp = path == crate::mcp::PATH || path.starts_with("/mcp/");
    let refusal = match request.app_data::<web::Data<BrowserPolicy>>() {
        Some(policy) if !mcp => {
            let headers = request.headers();
            let origins: Vec<Option<&str>> = headers
                .get_all(header::ORIGIN)
                .map(|value| value.to_str().ok())
                .collect();
            let host = headers
                .get(header::HOST)
                .and_then(|value| value.to_str().ok());
            policy.refusal(&origins, host)
        }
        _ => None,
    };
    match refusal {
        Some(reason) => {
            info!(method = %request.method(), path, reason, "browser request refused");
            let response = actix_web::ResponseError::error_response(&ApiError::Forbidden(reason));
            Ok(request.into_response(response))
        }
        None => next
            .call(request)
            .await
            .map(ServiceResponse::map_into_boxed_body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> BrowserPolicy {
        let origins = [
            "HTTPS://Canvas.Studio.example".into(),
            "http://dev.example:*".into(),
        ];
        BrowserPolicy::new(&origins, &["studio:7700".into()], true)
    }

    fn from(policy: &BrowserPolicy, page: &str, host: &str) -> Option<String> {
        policy.refusal(&[Some(page)], Some(host))
    }

    #[test]
    fn clients_without_an_origin_pass_under_loopback_names_and_addresses() {
        let policy = open();
        for host in [
            "127.0.0.1:7700",
            "localhost:7700",
            "[::1]:7700",
            "10.0.0.5",
            "LOCALHOST",
        ] {
            assert_eq!(policy.refusal(&[], Some(host)), None, "{host}");
        }
        assert_eq!(policy.refusal(&[], Some("studio:7700")), None);
    }

    #[test]
    fn an_open_daemon_refuses_names_it_was_not_given_and_malformed_hosts() {
        let policy = open();
        for host in [
            "rebound.attacker.example:7700",
            "[::1]evil.example",
            "localhost:x",
            "",
        ] {
            let refusal = policy.refusal(&[], Some(host));
            assert!(
                refusal.is_some_and(|r| r.contains("allowed_hosts")),
                "{host}"
            );
        }
        assert_eq!(policy.refusal(&[], None), None);
        let with_tokens = BrowserPolicy::new(&[], &[], false);
        assert_eq!(with_tokens.refusal(&[], Some("droplet.example:7700")), None);
    }

    #[test]
    fn pages_elsewhere_are_refused_unless_listed() {
        let policy = open();
        let host = "127.0.0.1:7700";
        for page in [
            "http://localhost:5173",
            "http://[::1]:3000",
            "https://canvas.studio.example",
            "http://DEV.example:8080",
            "http://127.0.0.1:7700",
        ] {
            assert_eq!(from(&policy, page, host), None, "{page}");
        }
        for page in [
            "https://evil.example",
            "http://localhost.evil.example:80",
            "null",
            "http://localhost//",
        ] {
            let refusal = from(&policy, page, host).unwrap();
            assert!(refusal.contains("allowed_origins"), "{page}: {refusal}");
        }
    }

    #[test]
    fn every_origin_header_counts_and_one_that_is_not_text_is_refused() {
        let policy = open();
        let host = Some("127.0.0.1:7700");
        let both = [Some("http://localhost:5173"), Some("https://evil.example")];
        assert!(policy.refusal(&both, host).is_some());
        assert!(policy.refusal(&[None], host).is_some());
    }

    #[test]
    fn a_page_the_daemon_serves_itself_is_same_origin() {
        let policy = BrowserPolicy::new(&[], &[], false);
        let host = "droplet.example:7700";
        assert_eq!(from(&policy, "http://droplet.example:7700", host), None);
        assert!(from(&policy, "http://droplet.example:8000", host).is_some());
    }
}
