//! Artifact downloads: the recorded name and type survive other runs storing the same bytes,
//! and whatever a step id holds, `Content-Disposition` is a valid header naming a file that
//! stays where it is saved.

use serde_json::{json, Value};

use crate::util::{cluster_config, step, TestDaemon};

fn intent(id: &str, prompt: &str) -> Value {
    json!({"name": "words", "nodes": [
        {"id": id, "type": "intent", "data": {"prompt": prompt}}]})
}

/// Runs a one-intent workflow to the end and answers its artifact's URL.
async fn intent_artifact(test: &TestDaemon, id: &str, prompt: &str) -> (String, Value) {
    let run_id = test.submit(&intent(id, prompt)).await;
    let run = test.wait_end(&run_id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let artifact = step(&run, id)["artifacts"][0].clone();
    let url = artifact["url"]
        .as_str()
        .expect("an artifact link")
        .to_string();
    (url, artifact)
}

/// The artifact's status, `Content-Type` and `Content-Disposition`.
async fn download(test: &TestDaemon, url: &str) -> (u16, String, String) {
    let response = test.get_response(url).await;
    let header = |name: &str| {
        let value = response.headers().get(name);
        let value = value.map(|v| v.to_str().expect("a visible ASCII header"));
        value.unwrap_or_default().to_string()
    };
    let (content_type, disposition) = (header("content-type"), header("content-disposition"));
    let status = response.status().as_u16();
    (status, content_type, disposition)
}

/// A step id with a line break, whose prompt matched another run's, made that other run's
/// artifact answer 500 "failed to parse header value" for good: the second store of the same
/// bytes overwrote the first's name. Such ids are refused now, and the first name is kept.
#[actix_rt::test]
async fn a_later_run_with_the_same_bytes_leaves_the_first_name_and_type_alone() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let (url, _) = intent_artifact(&test, "brief", "a lighthouse at dusk").await;
    let first = download(&test, &url).await;
    assert_eq!(first.0, 200, "{first:?}");
    assert_eq!(first.1, "text/plain; charset=utf-8");
    assert_eq!(first.2, r#"inline; filename="brief.txt""#);

    let broken = json!({"name": "crlf", "nodes": [
            {"id": "x\r\ny", "type": "intent", "data": {"prompt": "a lighthouse at dusk"}},
            {"id": "out", "type": "output"}],
        "edges": [{"id": "e\n1", "source": "x\r\ny", "target": "out"}]});
    let (status, body) = test.post("/api/workflows", &broken).await;
    assert_eq!(status, 400, "{body}");
    let issues = body["issues"].as_array().expect("issues");
    assert_eq!(issues.len(), 2, "{body}");
    assert_eq!(issues[0]["code"], "invalid_id", "{body}");
    assert_eq!(issues[0]["node"], "x\r\ny", "{body}");
    assert_eq!(issues[0]["field"], "id", "{body}");
    assert_eq!(issues[1]["code"], "invalid_id", "{body}");
    assert_eq!(issues[1]["edge"], "e\n1", "{body}");
    assert_eq!(issues[1]["field"], "id", "{body}");
    let message = issues[0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("control character"), "{body}");

    // Another run storing the same bytes under another name gets the same artifact, and
    // the first run's download is unchanged.
    let (again, artifact) = intent_artifact(&test, "other", "a lighthouse at dusk").await;
    assert_eq!(again, url);
    assert_eq!(artifact["filename"], "other.txt", "{artifact}");
    assert_eq!(download(&test, &url).await, first);
    test.daemon.stop().await;
}

/// Step ids become file names: one full of `../` went out as a path, and a non-ASCII one
/// raw instead of in RFC 6266's `filename*`.
#[actix_rt::test]
async fn file_names_from_step_ids_cannot_name_a_path_and_non_ascii_is_encoded() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let (url, artifact) = intent_artifact(&test, "../../../../tmp/pwned", "escape").await;
    assert_eq!(
        artifact["filename"], ".._.._.._.._tmp_pwned.txt",
        "{artifact}"
    );
    let (status, _, disposition) = download(&test, &url).await;
    assert_eq!(status, 200);
    assert_eq!(
        disposition,
        r#"inline; filename=".._.._.._.._tmp_pwned.txt""#
    );

    let (url, _) = intent_artifact(&test, r"C:\Users\über", "umlaut").await;
    let (status, _, disposition) = download(&test, &url).await;
    assert_eq!(status, 200);
    assert_eq!(
        disposition,
        "inline; filename=\"C:_Users__ber.txt\"; filename*=UTF-8''C%3A_Users_%C3%BCber.txt"
    );
    test.daemon.stop().await;
}

/// HEAD, as download managers and link checkers send it, answers GET's headers and no body.
#[actix_rt::test]
async fn head_answers_the_artifacts_headers_without_its_body() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let (url, artifact) = intent_artifact(&test, "brief", "a lighthouse at dusk").await;
    let head = test.http.head(test.url(&url)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let length = head.headers()["content-length"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(length, artifact["size"].to_string(), "{artifact}");
    assert!(head.headers().contains_key("content-disposition"));
    assert_eq!(head.bytes().await.unwrap().len(), 0);

    let health = test
        .http
        .head(test.url("/api/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    test.daemon.stop().await;
}
