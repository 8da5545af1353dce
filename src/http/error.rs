//! Every error the HTTP API answers, mapped to a status code in one place.
//!
//! Bodies are `{"error": code, "message": sentence}`, plus `issues` for an invalid workflow,
//! so clients can branch on the code and show the sentence.

use actix_web::error::{JsonPayloadError, QueryPayloadError};
use actix_web::http::header::{ALLOW, WWW_AUTHENTICATE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use multiplex_actors::cluster::ClusterError;
use multiplex_actors::lease::LeaseError;
use multiplex_actors::workflow::ValidationIssue;
use serde_json::json;
use tracing::error;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the workflow is invalid: {}", summarize(.0))]
    Invalid(Vec<ValidationIssue>),
    #[error("{0}")]
    BadRequest(String),
    /// No token, or one the daemon does not know (401 with `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token whose role is too low (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// A known route asked with a method it does not take (405 with `Allow`).
    #[error("{method} is not allowed on {path}; it takes {}", .allowed.join(", "))]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static [&'static str],
    },
    #[error("{0}")]
    Conflict(String),
    #[error("request body too large: {0}")]
    TooLarge(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn summarize(issues: &[ValidationIssue]) -> String {
    let first: Vec<String> = issues.iter().take(3).map(|i| i.message.clone()).collect();
    let more = issues.len().saturating_sub(3);
    if more > 0 {
        format!("{} (and {more} more)", first.join("; "))
    } else {
        first.join("; ")
    }
}

impl ApiError {
    /// The stable code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid_workflow",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut body = json!({ "error": self.code(), "message": self.to_string() });
        if let ApiError::Invalid(issues) = self {
            body["issues"] = json!(issues);
        }
        let mut response = HttpResponse::build(self.status_code());
        // RFC 6750: a bearer-token challenge on 401, the reason on 403.
        match self {
            ApiError::Unauthorized(_) => {
                response.insert_header((WWW_AUTHENTICATE, r#"Bearer realm="multiplex""#));
            }
            ApiError::Forbidden(_) => {
                response.insert_header((
                    WWW_AUTHENTICATE,
                    r#"Bearer realm="multiplex", error="insufficient_scope""#,
                ));
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                response.insert_header((ALLOW, allowed.join(", ")));
            }
            _ => {}
        }
        response.json(body)
    }
}

impl From<ClusterError> for ApiError {
    fn from(err: ClusterError) -> ApiError {
        match err {
            ClusterError::Invalid(issues) => ApiError::Invalid(issues),
            ClusterError::NotFound(_) | ClusterError::NoTunnel(_) | ClusterError::NoNode(_) => {
                ApiError::NotFound(err.to_string())
            }
            ClusterError::AlreadyEnded { .. } => ApiError::Conflict(err.to_string()),
            ClusterError::Lease(LeaseError::NotFound(_)) => ApiError::NotFound(err.to_string()),
            ClusterError::Lease(LeaseError::Invalid(_)) => ApiError::BadRequest(err.to_string()),
            ClusterError::Lease(LeaseError::NotEnoughNodes { .. }) => {
                ApiError::Conflict(err.to_string())
            }
            ClusterError::Store(_) | ClusterError::ActorGone(_) | ClusterError::Tunnel(_) => {
                error!(error = %err, "request failed inside the daemon");
                ApiError::Internal(err.to_string())
            }
        }
    }
}

/// JSON extraction that answers in our error shape and says what is wrong with the body.
pub fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(move |err, _req| {
            let api_error = match &err {
                JsonPayloadError::OverflowKnownLength { length, limit } => {
                    ApiError::TooLarge(format!("{length} bytes, the limit is {limit}"))
                }
                JsonPayloadError::Overflow { limit } => {
                    ApiError::TooLarge(format!("more than the limit of {limit} bytes"))
                }
                JsonPayloadError::ContentType => ApiError::BadRequest(
                    "the body must be JSON, sent with Content-Type: application/json".into(),
                ),
                JsonPayloadError::Deserialize(inner) => {
                    ApiError::BadRequest(format!("the body is not valid JSON: {inner}"))
                }
                other => ApiError::BadRequest(format!("cannot read the body: {other}")),
            };
            actix_web::error::InternalError::from_response(err, api_error.error_response()).into()
        })
}

/// Query-string extraction that answers in our error shape. The extractors' own fields
/// (see `ListQuery` in `api`) name the parameter and its rule in their errors; actix's
/// default answered `text/plain` "Query deserialize error: ...".
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _req| {
        let api_error = match &err {
            QueryPayloadError::Deserialize(inner) => {
                ApiError::BadRequest(format!("invalid query string: {inner}"))
            }
            other => ApiError::BadRequest(format!("invalid query string: {other}")),
        };
        actix_web::error::InternalError::from_response(err, api_error.error_response()).into()
    })
}

/// The app's default service: a path no route serves, answered in our shape rather than
/// actix's empty 404.
pub async fn unknown_route(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route {} {}; docs/api.md lists the routes",
        request.method(),
        request.path()
    )))
}

/// A resource at `path` that answers methods other than `allowed` with a 405 naming them;
/// `allowed` must list the methods of the routes added to it.
pub fn resource(path: &str, allowed: &'static [&'static str]) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move |request: HttpRequest| async move {
        Err::<HttpResponse, _>(ApiError::MethodNotAllowed {
            method: request.method().to_string(),
            path: request.path().to_string(),
            allowed,
        })
    }))
}
