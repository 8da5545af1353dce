//! Drives the LangFlow simulator over real sockets and checks the shapes of
//! 04_run_json, 05_run_stream, 06_errors, 07 quirks and 09 runtime errors.

use std::net::SocketAddr;

use multiplex_sim::{FlowBehavior, LangflowSim, LangflowSimConfig};
use serde_json::{json, Value};

const KEY: &str = "sk-test";
const ECHO: &str = "6f1c3a52-2a8e-4d5b-9a41-0c1e5d7b8a04";

async fn start(api_key: Option<&str>) -> LangflowSim {
    let config = LangflowSimConfig {
        api_key: api_key.map(str::to_owned),
        token_delay_ms: 1,
        ..LangflowSimConfig::default()
    };
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    LangflowSim::start(config, addr)
        .await
        .expect("simulator starts")
}

async fn run(sim: &LangflowSim, flow: &str, key: Option<&str>, body: Value) -> (u16, Value) {
    let url = sim.url().join(&format!("api/v1/run/{flow}")).unwrap();
    let mut request = reqwest::Client::new().post(url).json(&body);
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

fn answer_text(body: &Value) -> &str {
    body["outputs"][0]["outputs"][0]["results"]["message"]["text"]
        .as_str()
        .unwrap()
}

#[actix_rt::test]
async fn echo_run_matches_the_recording() {
    let sim = start(Some(KEY)).await;
    let body = json!({"input_value": "hello from the daemon", "input_type": "chat",
        "output_type": "chat", "session_id": "sess-1"});
    let (status, answer) = run(&sim, ECHO, Some(KEY), body).await;
    assert_eq!(status, 200);
    assert_eq!(answer["session_id"], "sess-1");
    assert_eq!(answer_text(&answer), "hello from the daemon");
    let output = &answer["outputs"][0]["outputs"][0];
    assert_eq!(
        answer["outputs"][0]["inputs"],
        json!({"input_value": "hello from the daemon"})
    );
    assert_eq!(output["component_id"], "ChatOutput-aaaa2");
    assert_eq!(output["messages"][0]["message"], "hello from the daemon");
    assert_eq!(output["results"]["message"]["data"]["flow_id"], ECHO);
    assert_eq!(
        output["results"]["message"]["properties"]["source"]["id"],
        "ChatInput-aaaa1"
    );

    let (_, by_name) = run(&sim, "echo", Some(KEY), json!({"input_value": "by name"})).await;
    assert_eq!(
        by_name["session_id"], ECHO,
        "no session_id: the flow id is used"
    );
    let (_, quirky) = run(&sim, "echo", Some(KEY), json!({"input_value": 123})).await;
    assert_eq!(quirky["outputs"][0]["inputs"], json!({}));
    assert_eq!(answer_text(&quirky), "");
    assert_eq!(sim.runs_received(), 3);
    sim.stop().await;
}

#[actix_rt::test]
async fn errors_have_the_recorded_bodies() {
    let sim = start(Some(KEY)).await;
    let (status, body) = run(
        &sim,
        "no-such-flow-name",
        Some(KEY),
        json!({"input_value": "x"}),
    )
    .await;
    assert_eq!(
        (status, body),
        (
            404,
            json!({"detail": "Flow identifier no-such-flow-name not found"})
        )
    );
    let (status, body) = run(&sim, ECHO, Some("wrong"), json!({"input_value": "x"})).await;
    assert_eq!(
        (status, body),
        (403, json!({"detail": "Invalid or missing API key"}))
    );
    let (status, body) = run(&sim, ECHO, None, json!({"input_value": "x"})).await;
    assert_eq!(status, 403);
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .starts_with("Since v1.5, LANGFLOW_AUTO_LOGIN"));
    let bearer = reqwest::Client::new()
        .post(sim.url().join(&format!("api/v1/run/{ECHO}")).unwrap())
        .bearer_auth(KEY)
        .json(&json!({"input_value": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 403);
    // A real LangFlow 1.13 checks the key before looking the flow up.
    let (status, body) = run(&sim, "no-such-flow-name", Some("wrong"), json!({})).await;
    assert_eq!(
        (status, body),
        (403, json!({"detail": "Invalid or missing API key"}))
    );

    let malformed = reqwest::Client::new()
        .post(sim.url().join(&format!("api/v1/run/{ECHO}")).unwrap())
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body("{\"input_value\": \"x\", ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 422);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(
        body,
        json!({"detail": [{"type": "json_invalid", "loc": ["body", 21],
        "msg": "JSON decode error"}]})
    );

    let conflict = json!({"input_value": "x", "tweaks": {"ChatInput-aaaa1": {"input_value": "y"}}});
    let (status, body) = run(&sim, ECHO, Some(KEY), conflict).await;
    assert_eq!(status, 400);
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .starts_with("If you pass an input_value"));

    let (status, body) = run(&sim, "fail", Some(KEY), json!({"input_value": "boom"})).await;
    assert_eq!(status, 500);
    let detail: Value = serde_json::from_str(body["detail"].as_str().unwrap()).unwrap();
    assert!(detail["message"]
        .as_str()
        .unwrap()
        .starts_with("Error running graph: "));
    sim.stop().await;
}

async fn stream_events(sim: &LangflowSim, flow: &str, body: Value) -> (String, Vec<Value>) {
    let url = sim
        .url()
        .join(&format!("api/v1/run/{flow}?stream=true"))
        .unwrap();
    let response = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = response.text().await.unwrap();
    let events = text
        .split("\n\n")
        .filter(|chunk| !chunk.trim().is_empty())
        .map(|chunk| serde_json::from_str(chunk).expect("each event is bare JSON"))
        .collect();
    (content_type, events)
}

#[actix_rt::test]
async fn streams_are_bare_json_events() {
    let sim = start(None).await;
    let body = json!({"input_value": "stream me", "session_id": "s"});
    let (content_type, events) = stream_events(&sim, "echo", body).await;
    assert_eq!(content_type, "text/event-stream; charset=utf-8");
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["add_message", "add_message", "end"]);
    assert_eq!(events[0]["data"]["sender"], "User");
    assert_eq!(answer_text(&events[2]["data"]["result"]), "stream me");

    let (_, events) =
        stream_events(&sim, "narration-text", json!({"input_value": "a red fox"})).await;
    let tokens: String = events
        .iter()
        .filter(|e| e["event"] == "token")
        .map(|e| e["data"]["chunk"].as_str().unwrap())
        .collect();
    let end = events.last().unwrap();
    assert_eq!(end["event"], "end");
    assert_eq!(tokens, answer_text(&end["data"]["result"]));
    assert!(tokens.starts_with("We open on a red fox."));

    let (_, events) = stream_events(&sim, "fail", json!({"input_value": "boom"})).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["add_message", "error", "error"]);
    assert!(events[2]["data"]["error"]
        .as_str()
        .unwrap()
        .starts_with("500: {"));
    sim.stop().await;
}

#[actix_rt::test]
async fn visual_narration_reads_the_uploaded_file() {
    let sim = start(Some(KEY)).await;
    let flow = sim
        .flows()
        .iter()
        .find(|f| f.behavior == FlowBehavior::NarrateVisual)
        .unwrap();
    let flow_id = flow.id.clone();
    let image = multiplex_sim::media::Image::solid(40, 30, 5, [1, 2, 3]);
    let clip = multiplex_sim::media::encode_apng(&image, 8.0, &[]).unwrap();
    let part = reqwest::multipart::Part::bytes(clip).file_name("clip.png");
    let response = reqwest::Client::new()
        .post(
            sim.url()
                .join(&format!("api/v1/files/upload/{flow_id}"))
                .unwrap(),
        )
        .header("x-api-key", KEY)
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let uploaded: Value = response.json().await.unwrap();
    for (key, detail) in [
        (None, "No authentication credentials provided"),
        (Some("wrong"), "Invalid API key"),
    ] {
        let url = sim.url().join(&format!("api/v1/files/upload/{flow_id}"));
        let part = reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("x.txt");
        let mut request = reqwest::Client::new()
            .post(url.unwrap())
            .multipart(reqwest::multipart::Form::new().part("file", part));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let refused = request.send().await.unwrap();
        assert_eq!(refused.status(), 403);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(
            body,
            json!({"detail": detail}),
            "upload refusal, key {key:?}"
        );
    }
    assert_eq!(uploaded["flowId"], flow_id.as_str());
    let path = uploaded["file_path"].as_str().unwrap();
    assert!(path.starts_with(&format!("{flow_id}/")) && path.ends_with("_clip.png"));

    let body = json!({"tweaks": {"ChatInput-aaaa1": {"files": [path], "input_value": "a walk"}}});
    let (status, answer) = run(&sim, "narration-visual", Some(KEY), body).await;
    assert_eq!(status, 200);
    assert!(
        answer_text(&answer).starts_with("A 5-frame png clip at 40x30."),
        "{answer}"
    );
    sim.stop().await;
}
