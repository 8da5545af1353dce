//! REST handlers: each one extracts, asks the [`Cluster`], and shapes the answer.

use actix_files::NamedFile;
use actix_web::http::header::{
    Charset, ContentDisposition, DispositionParam, DispositionType, ExtendedValue,
};
use actix_web::{web, HttpRequest, HttpResponse};
use multiplex_actors::artifact::safe_filename;
use multiplex_actors::cluster::Cluster;
use multiplex_actors::store::RunRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::resource;
use super::ApiError;
use crate::auth::Caller;

/// Most runs one listing returns.
const MAX_LIST: usize = 500;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api")
            .service(
                resource("/workflows", &["GET", "POST"])
                    .route(web::post().to(submit))
                    .route(web::get().to(list)),
            )
            .service(resource("/workflows/{id}", &["GET"]).route(web::get().to(get_run)))
            .service(resource("/workflows/{id}/cancel", &["POST"]).route(web::post().to(cancel)))
            .service(resource("/nodes", &["GET"]).route(web::get().to(nodes)))
            .service(
                resource("/nodes/{node}/restart", &["POST"]).route(web::post().to(restart_node)),
            )
            .service(resource("/tunnels", &["GET"]).route(web::get().to(tunnels)))
            .service(
                resource("/tunnels/{node}/reconnect", &["POST"])
                    .route(web::post().to(reconnect_tunnel)),
            )
            // HEAD for liveness probes, download managers and link checkers: the same
            // headers as GET, no body.
            .service(
                resource("/health", &["GET", "HEAD"])
                    .route(web::get().to(health))
                    .route(web::head().to(health)),
            )
            .service(
                resource("/artifacts/{id}", &["GET", "HEAD"])
                    .route(web::get().to(artifact))
                    .route(web::head().to(artifact)),
            ),
    );
}

/// The run as clients see it: the stored record with a download link on every artifact.
pub fn run_view(record: &RunRecord) -> Value {
    let mut view = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Some(object) = view.as_object_mut() {
        // The submitted document is the client's own; lists stay small without it.
        object.remove("document");
    }
    if let Some(steps) = view.get_mut("steps").and_then(Value::as_array_mut) {
        for step in steps {
            let Some(artifacts) = step.get_mut("artifacts").and_then(Value::as_array_mut) else {
                continue;
            };
            for artifact in artifacts {
                if let Some(id) = artifact.get("id").and_then(Value::as_str) {
                    artifact["url"] = json!(format!("/api/artifacts/{id}"));
                }
            }
        }
    }
    view
}

async fn submit(
    cluster: web::Data<Cluster>,
    document: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let record = cluster.submit(document.into_inner()).await?;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/workflows/{}", record.id)))
        .json(run_view(&record)))
}

/// `GET /api/workflows`' parameters, each checked as it is read so that the error names it:
/// a limit out of range used to be clamped, and a `before` that is no run id ignored.
#[derive(Deserialize)]
struct ListQuery {
    #[serde(default, deserialize_with = "list_limit")]
    limit: Option<usize>,
    #[serde(default, deserialize_with = "run_id")]
    before: Option<String>,
}

/// Runs one listing returns when `limit` is not given.
const DEFAULT_LIST: usize = 50;

fn list_limit<'de, D: serde::Deserializer<'de>>(value: D) -> Result<Option<usize>, D::Error> {
    let text = String::deserialize(value)?;
    match text.parse::<usize>() {
        Ok(limit) if (1..=MAX_LIST).contains(&limit) => Ok(Some(limit)),
        _ => Err(serde::de::Error::custom(format!(
            "`limit` must be an integer from 1 to {MAX_LIST}, got {text:?}"
        ))),
    }
}

/// Run ids are UUIDs, stored in their lowercase hyphenated form; any other spelling of one is
/// brought to it, since `before` is compared with the stored ids byte by byte.
fn run_id<'de, D: serde::Deserializer<'de>>(value: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(value)?;
    match uuid::Uuid::try_parse(&text) {
        Ok(id) => Ok(Some(id.hyphenated().to_string())),
        Err(_) => Err(serde::de::Error::custom(format!(
            "`before` must be a run id (a UUID), got {text:?}"
        ))),
    }
}

async fn list(
    cluster: web::Data<Cluster>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIST);
    let runs = cluster.runs(limit, query.before.as_deref())?;
    let views: Vec<Value> = runs.iter().map(run_view).collect();
    Ok(HttpResponse::Ok().json(json!({ "runs": views })))
}

async fn get_run(
    cluster: web::Data<Cluster>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let record = cluster.run(&id).await?;
    Ok(HttpResponse::Ok().json(run_view(&record)))
}

async fn cancel(
    cluster: web::Data<Cluster>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let record = cluster.cancel(&id).await?;
    Ok(HttpResponse::Ok().json(run_view(&record)))
}

async fn nodes(cluster: web::Data<Cluster>) -> Result<HttpResponse, ApiError> {
    let nodes = cluster.nodes().await?;
    Ok(HttpResponse::Ok().json(json!({ "nodes": nodes })))
}

async fn restart_node(
    cluster: web::Data<Cluster>,
    node: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let restarts = cluster.restart_node(&node).await?;
    Ok(HttpResponse::Ok().json(json!({ "node": node.as_str(), "restarts": restarts })))
}

async fn tunnels(cluster: web::Data<Cluster>) -> Result<HttpResponse, ApiError> {
    let tunnels = cluster.tunnels().await?;
    Ok(HttpResponse::Ok().json(json!({ "tunnels": tunnels })))
}

async fn reconnect_tunnel(
    cluster: web::Data<Cluster>,
    node: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let tunnel = cluster.reconnect_tunnel(&node).await?;
    Ok(HttpResponse::Ok().json(tunnel))
}

/// Open to anyone for liveness; the cluster summary only with a token (or on an open
/// daemon), so an anonymous probe learns nothing but "up".
async fn health(
    cluster: web::Data<Cluster>,
    caller: Option<web::ReqData<Caller>>,
) -> Result<HttpResponse, ApiError> {
    if caller.is_none() {
        return Ok(HttpResponse::Ok().json(json!({ "status": "ok" })));
    }
    let nodes = cluster.nodes().await?;
    Ok(HttpResponse::Ok().json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "nodes_total": nodes.len(),
        "nodes_available": nodes.iter().filter(|node| node.available).count(),
        "live_runs": cluster.live_runs(),
    })))
}

/// Serves an artifact's file with its recorded type; actix-files handles Range and ETags.
async fn artifact(
    cluster: web::Data<Cluster>,
    id: web::Path<String>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let files = cluster.store().artifacts();
    let meta = files
        .get(&id)
        .map_err(|err| ApiError::Internal(err.to_string()))?
        .ok_or_else(|| ApiError::NotFound(format!("no artifact with id {id}")))?;
    let path = files.path(&meta.id);
    let file = NamedFile::open_async(&path).await.map_err(|err| {
        ApiError::Internal(format!(
            "artifact {} is indexed but its file is unreadable: {err}",
            meta.id
        ))
    })?;
    let mime: mime::Mime = meta.mime.parse().unwrap_or(mime::APPLICATION_OCTET_STREAM);
    Ok(file
        .set_content_type(mime)
        .set_content_disposition(disposition(&meta.filename))
        .into_response(&request))
}

/// `inline` with the artifact's file name, built so that the header can always be sent: the
/// name is made safe again (an index written before names were cleaned may hold a step id
/// with a line break), an ASCII name goes in `filename`, and a non-ASCII one in RFC 6266's
/// `filename*` with an ASCII stand-in in `filename` for clients that know only that.
fn disposition(filename: &str) -> ContentDisposition {
    let name = safe_filename(filename);
    let mut parameters = Vec::with_capacity(2);
    if name.is_ascii() {
        parameters.push(DispositionParam::Filename(name));
    } else {
        let ascii: String = name
            .chars()
            .map(|c| if c.is_ascii() { c } else { '_' })
            .collect();
        parameters.push(DispositionParam::Filename(ascii));
        parameters.push(DispositionParam::FilenameExt(ExtendedValue {
            charset: Charset::Ext("UTF-8".into()),
            language_tag: None,
            value: name.into_bytes(),
        }));
    }
    ContentDisposition {
        disposition: DispositionType::Inline,
        parameters,
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::TryIntoHeaderValue;

    use super::disposition;

    #[test]
    fn every_file_name_makes_a_valid_content_disposition() {
        let header = |name: &str| {
            let value = disposition(name).try_into_value().expect("a valid header");
            value.to_str().expect("visible ASCII").to_owned()
        };
        assert_eq!(header("brief.txt"), r#"inline; filename="brief.txt""#);
        assert_eq!(header("x\r\ny.txt"), r#"inline; filename="x__y.txt""#);
        assert_eq!(
            header("../../../../tmp/pwned.txt"),
            r#"inline; filename=".._.._.._.._tmp_pwned.txt""#
        );
        assert_eq!(
            header("über.txt"),
            "inline; filename=\"_ber.txt\"; filename*=UTF-8''%C3%BCber.txt"
        );
        assert_eq!(
            header("say \"hi\".txt"),
            r#"inline; filename="say \"hi\".txt""#
        );
    }
}
