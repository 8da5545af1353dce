//! Malformed requests get a 4xx that says what is wrong; nothing panics and the daemon
//! keeps serving.

use serde_json::json;

use crate::util::{cluster_config, TestDaemon};

#[actix_rt::test]
async fn malformed_wrongly_typed_and_oversized_bodies_are_refused_clearly() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;

    let (status, body) = test
        .post_raw(
            "/api/workflows",
            "application/json",
            b"{\"nodes\": [".to_vec(),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );

    let (status, body) = test
        .post("/api/workflows", &json!(["not", "an", "object"]))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["issues"][0]["code"], "invalid_document", "{body}");

    let (status, body) = test
        .post("/api/workflows", &json!({"nodes": "three"}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["issues"].to_string().contains("nodes"), "{body}");

    let huge = vec![b' '; 2 * 1024 * 1024];
    let (status, body) = test
        .post_raw("/api/workflows", "application/json", huge)
        .await;
    assert_eq!(status, 413, "{body}");

    let (status, body) = test
        .post_raw("/api/workflows", "text/plain", b"{}".to_vec())
        .await;
    assert_eq!(status, 400, "{body}");

    let (status, body) = test.get("/api/workflows/not-a-run").await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = test.get("/api/artifacts/../../etc/passwd").await;
    assert!(
        status == 404 || status == 400,
        "path games are refused: {status}"
    );

    // Still healthy after all of that.
    let (status, health) = test.get("/api/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    test.daemon.stop().await;
}
