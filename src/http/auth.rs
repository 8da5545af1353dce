//! Bearer-token checks for every route, as two middlewares.
//!
//! - [`redact_query_token`] runs first, outside the request logger: it takes
//!   `access_token` out of the query string (keeping it in the request's extensions), so
//!   the token never reaches `tracing-actix-web`'s `http.target`, a handler or an error
//!   message.
//! - [`authenticate`] runs inside the logger (refusals are logged with their request): it
//!   finds the token, in `Authorization: Bearer <token>` on any route or in the query on
//!   `GET /ws` and `GET /api/artifacts/{id}` only (browsers cannot set headers on a
//!   WebSocket or an `<img src>`), checks it against [`Tokens`], and compares the caller's
//!   role with what the route needs ([`required_role`]). The [`Caller`] goes into the
//!   request's extensions for handlers that refine the check per message: the WebSocket's
//!   submit and cancel, MCP's tools.
//!
//! Missing or unknown token: 401 with `WWW-Authenticate: Bearer`. Role too low: 403. A daemon
//! without tokens lets everything through as an operator. `GET /api/health` needs no token
//! (liveness probes have none) and then answers only its status.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::uri::{PathAndQuery, Uri};
use actix_web::http::{header, Method};
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpMessage};
use tracing::info;

use super::ApiError;
use crate::auth::{Caller, Role, Tokens};

/// The query parameter browsers put the token in.
pub const QUERY_PARAM: &str = "access_token";

/// The token taken out of the query string. No `Debug`: it is a secret.
#[derive(Clone)]
struct QueryToken(String);

/// The role a route needs, `None` for the one open route. Decided by method and path in
/// one place, so a route added later is closed by default: reads need a viewer, anything
/// else an operator. `/mcp` needs a viewer for every method; its tools check the rest.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    let mcp = path == crate::mcp::PATH || path.starts_with("/mcp/");
    if path == "/api/health" && (*method == Method::GET || *method == Method::HEAD) {
        None
    } else if mcp || *method == Method::GET || *method == Method::HEAD {
        Some(Role::Viewer)
    } else {
        Some(Role::Operator)
    }
}

/// Where a token may come in the query string: a browser's WebSocket and `<img src>`.
fn query_token_allowed(method: &Method, path: &str) -> bool {
    let read = *method == Method::GET || *method == Method::HEAD;
    (*method == Method::GET && path == "/ws") || (read && path.starts_with("/api/artifacts/"))
}

/// Splits `access_token` out of a raw query string: the first value (decoded), and the
/// query without any `access_token` pair, the other pairs byte for byte as sent.
fn split_query_token(query: &str) -> (Option<String>, String) {
    let mut token = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let is_token = url::form_urlencoded::parse(key.as_bytes())
            .next()
            .is_some_and(|(key, _)| key == QUERY_PARAM);
        if is_token {
            if token.is_none() {
                let decoded = url::form_urlencoded::parse(format!("v={value}").as_bytes())
                    .next()
                    .map(|(_, value)| value.into_owned())
                    .unwrap_or_default();
                token = Some(decoded);
            }
        } else if !pair.is_empty() {
            kept.push(pair);
        }
    }
    (token, kept.join("&"))
}

/// Whether any key of the query decodes to `access_token`. Matched on decoded keys, as
/// [`split_query_token`] and every query parser read them: a raw substring test would let
/// `access%5Ftoken=` through to the logs.
fn has_query_token(query: &str) -> bool {
    !query.is_empty()
        && url::form_urlencoded::parse(query.as_bytes()).any(|(key, _)| key == QUERY_PARAM)
}

/// Takes `access_token` out of the URI before anything logs or routes it.
pub async fn redact_query_token(
    mut request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let query = request.query_string();
    if has_query_token(query) {
        let (token, kept) = split_query_token(query);
        if let Some(token) = token {
            let path = request.path();
            let rest = if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{kept}")
            };
            let mut parts = request.head().uri.clone().into_parts();
            parts.path_and_query = PathAndQuery::try_from(rest).ok();
            if let Ok(uri) = Uri::from_parts(parts) {
                request.match_info_mut().get_mut().update(&uri);
                request.head_mut().uri = uri;
            }
            request.extensions_mut().insert(QueryToken(token));
        }
    }
    next.call(request).await
}

/// How the request presented a token.
enum Presented {
    None,
    Token(String),
    /// An `Authorization` header that is not `Bearer <token>`.
    Malformed,
    /// `?access_token=` on a route that does not take it.
    QueryNotHere,
}

fn presented(request: &ServiceRequest) -> Presented {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or("");
        let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Presented::Malformed;
        }
        return Presented::Token(token.to_string());
    }
    let query = request.extensions().get::<QueryToken>().cloned();
    match query {
        Some(QueryToken(token)) if query_token_allowed(request.method(), request.path()) => {
            Presented::Token(token)
        }
        Some(_) => Presented::QueryNotHere,
        None => Presented::None,
    }
}

/// Checks the token and the role; see the module doc.
pub async fn authenticate(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let Some(tokens) = request.app_data::<web::Data<Tokens>>().cloned() else {
        // Only a wiring mistake gets here; refuse rather than serve unchecked.
        return Err(ApiError::Internal("authentication is not configured".into()).into());
    };
    if tokens.is_open() {
        request.extensions_mut().insert(Caller::open());
        return Ok(next.call(request).await?.map_into_boxed_body());
    }
    let needed = required_role(request.method(), request.path());
    let caller = match presented(&request) {
        Presented::None if needed.is_none() => None,
        Presented::None => {
            let also = if query_token_allowed(request.method(), request.path()) {
                " (or ?access_token=<token> on this route)"
            } else {
                ""
            };
            return Err(refuse(
                &request,
                ApiError::Unauthorized(format!(
                    "this daemon needs a token: send Authorization: Bearer <token>{also}"
                )),
            ));
        }
        Presented::Malformed => {
            return Err(refuse(
                &request,
                ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into()),
            ))
        }
        Presented::QueryNotHere => {
            return Err(refuse(
                &request,
                ApiError::Unauthorized(format!(
                    "?{QUERY_PARAM} is accepted only on GET /ws and GET /api/artifacts/{{id}}; \
                     send Authorization: Bearer <token>"
                )),
            ))
        }
        Presented::Token(token) => match tokens.check(&token) {
            Some(caller) => Some(caller),
            None => {
                return Err(refuse(
                    &request,
                    ApiError::Unauthorized("the token is not one this daemon knows".into()),
                ))
            }
        },
    };
    if let (Some(needed), Some(caller)) = (needed, &caller) {
        if !caller.may(needed) {
            let message = format!(
                "{} {} needs the {needed} role; this token has the {} role",
                request.method(),
                request.path(),
                caller.role
            );
            info!(token = ?caller.token, %needed, "refused: role too low");
            return Err(ApiError::Forbidden(message).into());
        }
    }
    if let Some(caller) = caller {
        request.extensions_mut().insert(caller);
    }
    Ok(next.call(request).await?.map_into_boxed_body())
}

fn refuse(request: &ServiceRequest, error: ApiError) -> Error {
    info!(method = %request.method(), path = request.path(), reason = %error,
        "refused: no valid token");
    error.into()
}

#[cfg(test)]
mod tests {
    use actix_web::test::{call_and_read_body, init_service, TestRequest};
    use actix_web::{middleware::from_fn, App, HttpRequest, HttpResponse};

    use super::*;

    #[test]
    fn the_token_leaves_the_query_and_the_rest_stays_as_sent() {
        let (token, kept) = split_query_token("since=3&access_token=a%2Bb+c&x=%41");
        assert_eq!(token.as_deref(), Some("a+b c"));
        assert_eq!(kept, "since=3&x=%41");
        let (token, kept) = split_query_token("access_token=one&access_token=two");
        assert_eq!(token.as_deref(), Some("one"));
        assert_eq!(kept, "");
        assert_eq!(split_query_token("limit=5"), (None, "limit=5".to_string()));
    }

    #[test]
    fn reads_need_a_viewer_and_the_rest_an_operator() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(required_role(&get, "/api/health"), None);
        assert_eq!(required_role(&post, "/api/health"), Some(Role::Operator));
        assert_eq!(required_role(&get, "/api/workflows"), Some(Role::Viewer));
        assert_eq!(required_role(&post, "/api/workflows"), Some(Role::Operator));
        assert_eq!(required_role(&post, "/mcp"), Some(Role::Viewer));
        assert_eq!(required_role(&Method::DELETE, "/mcp"), Some(Role::Viewer));
        assert_eq!(required_role(&post, "/mcpx"), Some(Role::Operator));
        assert!(query_token_allowed(&get, "/ws"));
        assert!(query_token_allowed(&get, "/api/artifacts/abc"));
        assert!(!query_token_allowed(&get, "/api/workflows"));
        assert!(!query_token_allowed(&post, "/ws"));
    }

    #[actix_rt::test]
    async fn handlers_and_loggers_inside_never_see_the_query_token() {
        async fn echo(request: HttpRequest) -> HttpResponse {
            HttpResponse::Ok().body(request.uri().to_string())
        }
        let app = init_service(
            App::new()
                .route("/ws", web::get().to(echo))
                .wrap(from_fn(redact_query_token)),
        )
        .await;
        let request = TestRequest::get()
            .uri("/ws?access_token=s3cret&since=1")
            .to_request();
        let body = call_and_read_body(&app, request).await;
        assert_eq!(std::str::from_utf8(&body).unwrap(), "/ws?since=1");
    }
}
