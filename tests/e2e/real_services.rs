//! Opt-in checks against real servers, for machines that have them. Each test runs only when
//! its environment variable names a server, and says so when it does not:
//!
//! - `MULTIPLEX_REAL_COMFYUI=http://127.0.0.1:8188`: a ComfyUI (no models needed).
//! - `MULTIPLEX_REAL_LANGFLOW=http://127.0.0.1:7860` with `MULTIPLEX_REAL_LANGFLOW_FLOW` (the
//!   id or endpoint name of a Chat Input -> Chat Output flow) and, when the server wants one,
//!   `MULTIPLEX_REAL_LANGFLOW_KEY`.

use serde_json::json;

use crate::util::{step, TestDaemon};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

#[actix_rt::test]
async fn real_comfyui_runs_an_inline_workflow_and_reports_its_own_node_errors() {
    let Some(url) = env("MULTIPLEX_REAL_COMFYUI") else {
        eprintln!("skipped: set MULTIPLEX_REAL_COMFYUI to run against a real ComfyUI");
        return;
    };
    let config = format!(
        "[[nodes]]\nname = \"real\"\n[nodes.comfyui]\nurl = \"{url}\"\ncapabilities = []\n"
    );
    let test = TestDaemon::start(&config).await;

    let good = json!({"name": "real invert", "nodes": [{"id": "raw", "type": "comfyui",
        "data": {"workflow": {
            "1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16744448}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage",
                  "inputs": {"images": ["2", 0], "filename_prefix": "multiplex_real"}}}}}],
        "edges": []});
    let id = test.submit(&good).await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(step(&run, "raw")["artifacts"][0]["mime"], "image/png");

    let bad = json!({"name": "real invalid", "nodes": [{"id": "raw", "type": "comfyui",
        "data": {"workflow": {
            "1": {"class_type": "ImageInvert", "inputs": {}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}}}],
        "edges": []});
    let id = test.submit(&bad).await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "failed");
    assert!(
        step(&run, "raw")["error"]["details"]
            .to_string()
            .contains("required_input_missing")
            || step(&run, "raw")["error"]
                .to_string()
                .contains("Required input is missing"),
        "ComfyUI's own node_errors: {run}"
    );
    test.daemon.stop().await;
}

#[actix_rt::test]
async fn real_langflow_returns_the_text_of_a_chat_flow() {
    let (Some(url), Some(flow)) = (
        env("MULTIPLEX_REAL_LANGFLOW"),
        env("MULTIPLEX_REAL_LANGFLOW_FLOW"),
    ) else {
        eprintln!("skipped: set MULTIPLEX_REAL_LANGFLOW and MULTIPLEX_REAL_LANGFLOW_FLOW");
        return;
    };
    let key = if env("MULTIPLEX_REAL_LANGFLOW_KEY").is_some() {
        "api_key_env = \"MULTIPLEX_REAL_LANGFLOW_KEY\"\n"
    } else {
        ""
    };
    let config = format!(
        "[[nodes]]\nname = \"real\"\n[nodes.langflow]\nurl = \"{url}\"\n{key}\
         flows.\"chat\" = {{ id = \"{flow}\" }}\n"
    );
    let test = TestDaemon::start(&config).await;
    let workflow = json!({"name": "real chat", "nodes": [{"id": "talk", "type": "langflow",
        "data": {"flow": "chat", "input": "hello from multiplex"}}], "edges": []});
    let id = test.submit(&workflow).await;
    let run = test.wait_end(&id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    let url = step(&run, "talk")["artifacts"][0]["url"]
        .as_str()
        .unwrap()
        .to_string();
    let text = test
        .http
        .get(test.url(&url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("hello from multiplex"), "{text}");
    test.daemon.stop().await;
}
