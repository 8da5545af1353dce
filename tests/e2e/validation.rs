//! Every kind of invalid workflow is refused before anything runs, with every problem named.

use serde_json::{json, Value};

use crate::util::{cluster_config, TestDaemon};

/// Submits and returns the issues of the 400 answer.
async fn issues_of(test: &TestDaemon, workflow: Value) -> Vec<Value> {
    let (status, body) = test.post("/api/workflows", &workflow).await;
    assert_eq!(status, 400, "expected a refusal: {body}");
    assert_eq!(body["error"], "invalid_workflow", "{body}");
    body["issues"].as_array().cloned().unwrap_or_default()
}

fn has(issues: &[Value], code: &str, node: Option<&str>, edge: Option<&str>) -> bool {
    issues.iter().any(|issue| {
        issue["code"] == code
            && node.is_none_or(|n| issue["node"] == n)
            && edge.is_none_or(|e| issue["edge"] == e)
    })
}

#[actix_rt::test]
async fn every_validation_problem_is_reported_at_once_naming_its_culprit() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;

    let issues = issues_of(
        &test,
        json!({
            "name": "many problems",
            "nodes": [
                {"id": "a", "type": "intent", "data": {"prompt": "x"}},
                {"id": "a", "type": "intent", "data": {"prompt": "y"}},
                {"id": "w", "type": "wormhole", "data": {}},
                {"id": "img", "type": "image", "data": {"steps": "many"}},
                {"id": "noprompt", "type": "intent", "data": {}}
            ],
            "edges": [
                {"id": "e1", "source": "a", "target": "img"},
                {"id": "e2", "source": "a", "target": "ghost"},
                {"id": "e1", "source": "img", "target": "w"}
            ]
        }),
    )
    .await;
    assert!(
        has(&issues, "duplicate_node_id", Some("a"), None),
        "{issues:?}"
    );
    assert!(
        has(&issues, "duplicate_edge_id", None, Some("e1")),
        "{issues:?}"
    );
    assert!(has(&issues, "unknown_type", Some("w"), None), "{issues:?}");
    assert!(
        has(&issues, "invalid_parameter", Some("img"), None),
        "{issues:?}"
    );
    assert!(
        has(&issues, "missing_parameter", Some("noprompt"), None),
        "{issues:?}"
    );
    assert!(has(&issues, "missing_node", None, Some("e2")), "{issues:?}");
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn cycles_wrong_kinds_missing_inputs_and_impossible_steps_are_refused() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;

    let cycle = issues_of(
        &test,
        json!({
            "nodes": [
                {"id": "p", "type": "langflow", "data": {"flow": "echo"}},
                {"id": "q", "type": "langflow", "data": {"flow": "echo"}}
            ],
            "edges": [
                {"id": "e1", "source": "p", "target": "q"},
                {"id": "e2", "source": "q", "target": "p"}
            ]
        }),
    )
    .await;
    assert!(
        cycle
            .iter()
            .any(|i| i["code"] == "cycle" && matches!(i["node"].as_str(), Some("p" | "q"))),
        "{cycle:?}"
    );

    // An image step takes text; a video is the wrong kind of input for it.
    let wrong_kind = issues_of(
        &test,
        json!({
            "nodes": [
                {"id": "brief", "type": "intent", "data": {"prompt": "x"}},
                {"id": "still", "type": "image", "data": {}},
                {"id": "clip", "type": "video", "data": {}},
                {"id": "again", "type": "image", "data": {"prompt": "y"}}
            ],
            "edges": [
                {"id": "e1", "source": "brief", "target": "still"},
                {"id": "e2", "source": "still", "target": "clip"},
                {"id": "e3", "source": "clip", "target": "again"}
            ]
        }),
    )
    .await;
    assert!(
        has(&wrong_kind, "wrong_input_kind", None, Some("e3")),
        "{wrong_kind:?}"
    );

    let missing_input = issues_of(
        &test,
        json!({
            "nodes": [{"id": "clip", "type": "video", "data": {}}],
            "edges": []
        }),
    )
    .await;
    assert!(
        has(&missing_input, "missing_input", Some("clip"), None),
        "{missing_input:?}"
    );

    let impossible = issues_of(&test, json!({
        "nodes": [{"id": "talk", "type": "langflow", "data": {"flow": "not-served", "input": "x"}}],
        "edges": []
    }))
    .await;
    assert!(
        has(&impossible, "no_capable_node", Some("talk"), None),
        "{impossible:?}"
    );

    let handles = issues_of(
        &test,
        json!({
            "nodes": [
                {"id": "brief", "type": "intent", "data": {"prompt": "x"}},
                {"id": "still", "type": "image", "data": {}}
            ],
            "edges": [{"id": "e1", "source": "brief", "target": "still", "targetHandle": "nope"}]
        }),
    )
    .await;
    assert!(
        has(&handles, "unknown_handle", None, Some("e1")),
        "{handles:?}"
    );

    let ui_export = issues_of(
        &test,
        json!({
            "nodes": [{"id": "raw", "type": "comfyui",
                       "data": {"workflow": {"nodes": [], "links": [], "version": 0.4}}}],
            "edges": []
        }),
    )
    .await;
    assert!(
        has(&ui_export, "invalid_workflow", Some("raw"), None),
        "{ui_export:?}"
    );
    test.daemon.stop().await;
}

/// A run's record is rewritten whole on every step's transition, so a fan-in of thousands
/// of steps wrote gigabytes. Documents over `[daemon] max_steps` nodes are refused, with
/// one issue naming the count and the limit, whatever else is wrong with them.
#[actix_rt::test]
async fn workflows_with_more_steps_than_max_steps_are_refused_naming_both_counts() {
    let test = TestDaemon::start(&cluster_config(1, "[daemon]\nmax_steps = 3\n")).await;
    let intents = |count: usize| -> Vec<Value> {
        let intent = |i| json!({"id": format!("s{i}"), "type": "intent", "data": {"prompt": "x"}});
        (0..count).map(intent).collect()
    };

    let mut nodes = intents(3);
    nodes.push(json!({"id": "typo", "type": "intnet"}));
    let issues = issues_of(&test, json!({"name": "big", "nodes": nodes})).await;
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0]["code"], "too_many_steps", "{issues:?}");
    assert_eq!(issues[0]["field"], "nodes", "{issues:?}");
    let message = issues[0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("has 4 steps"), "{message}");
    assert!(message.contains("at most 3"), "{message}");
    assert!(message.contains("max_steps"), "{message}");

    let id = test
        .submit(&json!({"name": "fits", "nodes": intents(3)}))
        .await;
    assert_eq!(test.wait_end(&id).await["state"], "succeeded");
    test.daemon.stop().await;
}
