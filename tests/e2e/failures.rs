//! Failures reported by the services show up in the run, verbatim and attributed.

use serde_json::json;

use crate::util::{cluster_config, step, TestDaemon};

#[actix_rt::test]
async fn comfyui_rejecting_a_prompt_fails_the_step_with_its_node_errors() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let workflow = json!({
        "name": "bad graph",
        "nodes": [{"id": "raw", "type": "comfyui", "data": {"workflow": {
            "1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "NoSuchNode", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                       "filename_prefix": "bad"}}
        }}}],
        "edges": []
    });
    let id = test.submit(&workflow).await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "failed");
    let error = &step(&run, "raw")["error"];
    assert!(
        error["message"].as_str().unwrap().contains("NoSuchNode"),
        "{error}"
    );
    // ComfyUI's own answer is kept whole for the user.
    assert!(
        error["details"].to_string().contains("NoSuchNode"),
        "{error}"
    );
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn a_partly_invalid_prompt_runs_its_valid_branch_and_says_what_was_dropped() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let mut activity = test.activity(None).await;
    let workflow = json!({
        "name": "half good",
        "nodes": [{"id": "raw", "type": "comfyui", "data": {"workflow": {
            "1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                       "filename_prefix": "good"}},
            "3": {"class_type": "ImageInvert", "inputs": {}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0],
                                                       "filename_prefix": "bad"}}
        }}}],
        "edges": []
    });
    let id = test.submit(&workflow).await;
    let seen = activity
        .until(|m| {
            m["type"] == "run_state"
                && m["run_id"] == id.as_str()
                && matches!(m["state"].as_str(), Some("succeeded" | "failed"))
        })
        .await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(
        step(&run, "raw")["artifacts"].as_array().unwrap().len(),
        1,
        "{run}"
    );
    let notice = seen.iter().find(|m| m["type"] == "step_notice");
    assert!(notice.is_some(), "the dropped branch is reported: {seen:?}");
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn a_langflow_server_error_fails_the_step_with_its_detail() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let workflow = json!({
        "name": "flow that raises",
        "nodes": [{"id": "talk", "type": "langflow", "data": {"flow": "fail", "input": "hi"}}],
        "edges": []
    });
    let id = test.submit(&workflow).await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "failed");
    let message = step(&run, "talk")["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    // The flow's own exception text, decoded from LangFlow's JSON-in-a-string detail.
    assert!(message.contains("simulated failure"), "{message}");
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn one_failed_branch_skips_its_dependents_and_fails_the_run() {
    let test = TestDaemon::start(&cluster_config(1, "")).await;
    let workflow = json!({
        "name": "fails early",
        "nodes": [
            {"id": "talk", "type": "langflow", "data": {"flow": "fail", "input": "hi"}},
            {"id": "after", "type": "langflow", "data": {"flow": "echo"}}
        ],
        "edges": [{"id": "e1", "source": "talk", "target": "after"}]
    });
    let id = test.submit(&workflow).await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "failed");
    assert_eq!(step(&run, "after")["state"], "skipped", "{run}");
    test.daemon.stop().await;
}
