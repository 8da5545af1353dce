//! Drives the LangFlow simulator over real sockets and checks the shapes of
//! 04_run_json, 05_run_stream, 06_errors, 07 quirks and 09 runtime errors.

use std::net::SocketAddr;

use multiplex_sim::langflow::LangflowControl;
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

async fn messages(sim: &LangflowSim, session: &str, key: Option<&str>) -> (u16, Value) {
    let mut url = sim.url().join("api/v1/monitor/messages").unwrap();
    url.query_pairs_mut().append_pair("session_id", session);
    let mut request = reqwest::Client::new().get(url);
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Polls the session's messages every 10 ms for up to 10 s until `ready` holds.
async fn messages_until(sim: &LangflowSim, session: &str, ready: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, listed) = messages(sim, session, Some(KEY)).await;
        if ready(&listed) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "messages: {listed}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn senders(listed: &Value) -> Vec<&str> {
    let all = listed.as_array().map(Vec::as_slice).unwrap_or_default();
    all.iter().filter_map(|m| m["sender"].as_str()).collect()
}

/// 08_flow_readback_and_messages: a run leaves the user's message and the answer behind.
#[actix_rt::test]
async fn runs_leave_messages_in_the_recorded_shape() {
    let sim = start(Some(KEY)).await;
    let body = json!({"input_value": "hello from the daemon", "session_id": "sess-m"});
    assert_eq!(run(&sim, ECHO, Some(KEY), body).await.0, 200);
    let (status, listed) = messages(&sim, "sess-m", Some(KEY)).await;
    assert_eq!(status, 200);
    assert_eq!(senders(&listed), ["User", "Machine"]);
    let answer = &listed[1];
    assert_eq!(answer["text"], "hello from the daemon");
    assert_eq!(answer["flow_id"], ECHO);
    assert_eq!(answer["session_id"], "sess-m");
    assert_eq!(answer["sender_name"], "AI");
    assert_eq!(answer["files"], "[]");
    assert_eq!(answer["properties"]["source"]["id"], "ChatInput-aaaa1");
    assert!(answer["timestamp"].as_str().unwrap().ends_with(" UTC"));
    assert_eq!(messages(&sim, "other", Some(KEY)).await.1, json!([]));
    assert_eq!(messages(&sim, "sess-m", None).await.0, 403);
    assert_eq!(messages(&sim, "sess-m", Some("wrong")).await.0, 403);

    // The failing flow leaves an error message from its component instead of an answer.
    let body = json!({"input_value": "x", "session_id": "sess-f"});
    assert_eq!(run(&sim, "fail", Some(KEY), body).await.0, 500);
    let (_, listed) = messages(&sim, "sess-f", Some(KEY)).await;
    assert_eq!(senders(&listed), ["User", "Combine Text"]);
    assert_eq!(listed[1]["category"], "error");
    sim.stop().await;
}

#[actix_rt::test]
async fn switches_slow_runs_and_fail_them() {
    let sim = start(Some(KEY)).await;
    sim.control(LangflowControl {
        run_delay_ms: Some(300),
        ..LangflowControl::default()
    });
    // A slow run shows its question at once and its answer only at the end.
    let body = json!({"input_value": "slow", "session_id": "sess-slow"});
    let slow = run(&sim, ECHO, Some(KEY), body);
    let watch = async {
        messages_until(&sim, "sess-slow", |m| senders(m) == ["User"]).await;
        messages_until(&sim, "sess-slow", |m| senders(m) == ["User", "Machine"]).await;
    };
    let ((status, _), ()) = tokio::join!(slow, watch);
    assert_eq!(status, 200);

    sim.control(LangflowControl {
        run_delay_ms: Some(0),
        fail_next_503: Some(1),
        fail_next_500: Some(1),
    });
    // A proxy timeout: the flow ran, the client only sees an HTML 503.
    let url = sim.url().join(&format!("api/v1/run/{ECHO}")).unwrap();
    let response = reqwest::Client::new()
        .post(url)
        .header("x-api-key", KEY)
        .json(&json!({"input_value": "lost answer", "session_id": "sess-503"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.text().await.unwrap().contains("<html>"));
    let (_, listed) = messages(&sim, "sess-503", Some(KEY)).await;
    assert_eq!(senders(&listed), ["User", "Machine"]);

    let body = json!({"input_value": "x", "session_id": "sess-500"});
    let (status, answer) = run(&sim, ECHO, Some(KEY), body.clone()).await;
    assert_eq!(status, 500);
    assert!(answer["detail"].is_string());
    // The switches are used up.
    assert_eq!(run(&sim, ECHO, Some(KEY), body).await.0, 200);

    assert_eq!(sim.duplicate_sessions(), vec!["sess-500".to_string()]);
    assert_eq!(sim.runs_by_session().get("sess-slow"), Some(&1));
    let stats: Value = reqwest::get(sim.url().join("sim/stats").unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["runs_by_session"]["sess-500"], 2);
    assert_eq!(stats["duplicate_sessions"], json!(["sess-500"]));
    sim.stop().await;
}
