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
        BrowserPolicy {
            origins: LOOPBACK_ORIGINS
                .iter()
                .map(|origin| origin.to_string())
                .chain(
                    allowed_origins
                        .iter()
                        .map(|o| o.trim_end_matches('/').to_string()),
                )
                .collect(),
            hosts: LOOPBACK_HOSTS
                .iter()
                .map(|host| host.to_string())
                .chain(allowed_hosts.iter().map(|h| h.to_ascii_lowercase()))
                .collect(),
            check_host: open,
        }
    }

    /// Why a request with these headers is refused, or `None` when it may go on.
    fn refusal(&self, origin: Option<&str>, host: Option<&str>) -> Option<String> {
        if self.check_host {
            let name = host.map(host_name).unwrap_or_default();
            if !self.host_allowed(&name) {
                return Some(format!(
                    "this daemon does not answer under the host name {name:?}; list it in \
                     [daemon] allowed_hosts, or configure tokens"
                ));
            }
        }
        let origin = origin?.trim_end_matches('/');
        let same_origin = host.is_some_and(|host| origin_authority(origin) == Some(host));
        if same_origin
            || self
                .origins
                .iter()
                .any(|allowed| origin_matches(allowed, origin))
        {
            return None;
        }
        Some(format!(
            "requests from pages at {origin} are refused; list the origin in [daemon] \
             allowed_origins to allow them"
        ))
    }

    fn host_allowed(&self, name: &str) -> bool {
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>().is_ok() || self.hosts.iter().any(|host| host == bare)
    }
}

/// The host of a `Host` header, lowercased, without its port (`[::1]:7700` -> `[::1]`).
fn host_name(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map(|h| format!("{h}]"))
            .unwrap_or(host);
    }
    host.rsplit_once(':')
        .map(|(name, _)| name.to_string())
        .unwrap_or(host)
}

/// `host[:port]` of an origin such as `http://localhost:5173`.
fn origin_authority(origin: &str) -> Option<&str> {
    origin.split_once("://").map(|(_, authority)| authority)
}

/// Whether `origin` is `allowed`, where an `allowed` ending in `:*` takes any port.
fn origin_matches(allowed: &str, origin: &str) -> bool {
    match allowed.strip_suffix(":*") {
        Some(prefix) => {
            let port = origin
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix(':'));
            origin == prefix
                || port.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        }
        None => allowed.eq_ignore_ascii_case(origin),
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
            let text = |name| headers.get(name).and_then(|value| value.to_str().ok());
            policy.refusal(text(header::ORIGIN), text(header::HOST))
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
        BrowserPolicy::new(
            &["https://canvas.studio.example".into()],
            &["studio".into()],
            true,
        )
    }

    #[test]
    fn clients_without_an_origin_pass_under_loopback_names_and_addresses() {
        let policy = open();
        for host in [
            "127.0.0.1:7700",
            "localhost:7700",
            "[::1]:7700",
            "10.0.0.5:7700",
        ] {
            assert_eq!(policy.refusal(None, Some(host)), None, "{host}");
        }
        assert_eq!(policy.refusal(None, Some("studio:7700")), None);
    }

    #[test]
    fn an_open_daemon_refuses_names_it_was_not_given() {
        let refusal = open().refusal(None, Some("rebound.attacker.example:7700"));
        assert!(refusal.unwrap().contains("allowed_hosts"));
        let with_tokens = BrowserPolicy::new(&[], &[], false);
        assert_eq!(
            with_tokens.refusal(None, Some("droplet.example:7700")),
            None
        );
    }

    #[test]
    fn pages_elsewhere_are_refused_unless_listed() {
        let policy = open();
        let host = Some("127.0.0.1:7700");
        assert_eq!(policy.refusal(Some("http://localhost:5173"), host), None);
        assert_eq!(policy.refusal(Some("http://[::1]:3000"), host), None);
        assert_eq!(
            policy.refusal(Some("https://canvas.studio.example"), host),
            None
        );
        assert_eq!(policy.refusal(Some("http://127.0.0.1:7700"), host), None);
        for page in [
            "https://evil.example",
            "http://localhost.evil.example:80",
            "null",
        ] {
            let refusal = policy.refusal(Some(page), host).unwrap();
            assert!(refusal.contains("allowed_origins"), "{page}: {refusal}");
        }
    }

    #[test]
    fn a_page_the_daemon_serves_itself_is_same_origin() {
        let policy = BrowserPolicy::new(&[], &[], false);
        let host = Some("droplet.example:7700");
        assert_eq!(
            policy.refusal(Some("http://droplet.example:7700"), host),
            None
        );
        assert!(policy
            .refusal(Some("http://droplet.example:8000"), host)
            .is_some());
    }
}
