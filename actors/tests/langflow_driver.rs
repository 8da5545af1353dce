//! The LangFlow driver against the LangFlow simulator, over real sockets.
//!
//! Guards the run contract (our session id sent and echoed, the text found in the answer),
//! streaming (tokens as they come, text from `end`, flows without tokens), file attachment
//! for visual narration, and the mapping of LangFlow's error answers.

use std::net::SocketAddr;
use std::path::PathBuf;

use multiplex_actors::config::FlowConfig;
use multiplex_actors::langflow::{run_job, LangflowClient, LangflowError, RunRequest};
use multiplex_actors::workflow::LangflowJob;
use multiplex_sim::langflow::{LangflowSim, LangflowSimConfig};
use serde_json::{json, Map};

const KEY: &str = "sk-test-key";

async fn start() -> (LangflowSim, LangflowClient) {
    let config = LangflowSimConfig {
        api_key: Some(KEY.into()),
        token_delay_ms: 0,
        ..LangflowSimConfig::default()
    };
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
    let sim = LangflowSim::start(config, addr)
        .await
        .expect("simulator starts");
    let client = LangflowClient::new(sim.url(), Some(KEY.into()));
    (sim, client)
}

fn request(input: &str, session: &str) -> RunRequest {
    RunRequest {
        input_value: Some(input.into()),
        input_type: "chat".into(),
        output_type: "chat".into(),
        tweaks: Map::new(),
        session_id: session.into(),
    }
}

fn flow_id(sim: &LangflowSim, endpoint: &str) -> String {
    let flow = sim
        .flows()
        .iter()
        .find(|f| f.endpoint_name.as_deref() == Some(endpoint));
    flow.expect("a default flow").id.clone()
}

#[actix_rt::test]
async fn run_echoes_our_session_and_finds_the_text() {
    let (sim, client) = start().await;
    client.health().await.expect("healthy");

    let answer = client
        .run("echo", &request("hello from the daemon", "sess-1"))
        .await
        .unwrap();
    assert_eq!(answer.session_id.as_deref(), Some("sess-1"));
    assert_eq!(answer.text, "hello from the daemon");

    let by_id = client
        .run(&flow_id(&sim, "echo"), &request("by id", "sess-2"))
        .await
        .unwrap();
    assert_eq!(by_id.text, "by id");
    sim.stop().await;
}

#[actix_rt::test]
async fn stream_hands_out_tokens_and_ends_with_the_text() {
    let (sim, client) = start().await;
    let mut tokens = String::new();
    let answer = client
        .run_stream(
            "narration-text",
            &request("a lighthouse at dusk", "sess-3"),
            |token| tokens.push_str(token),
        )
        .await
        .expect("streamed run");
    assert!(
        answer.text.starts_with("We open on a lighthouse at dusk"),
        "{}",
        answer.text
    );
    assert_eq!(tokens, answer.text);

    // Echo streams no tokens at all; the text still comes from `end`.
    let mut count = 0;
    let answer = client
        .run_stream("echo", &request("no tokens", "sess-4"), |_| count += 1)
        .await
        .expect("streamed run");
    assert_eq!((count, answer.text.as_str()), (0, "no tokens"));
    sim.stop().await;
}

#[actix_rt::test]
async fn errors_map_to_their_meaning() {
    let (sim, client) = start().await;
    let err = client
        .run("no-such-flow", &request("x", "s"))
        .await
        .unwrap_err();
    assert!(matches!(err, LangflowError::NotFound { ref flow } if flow == "no-such-flow"));

    let stranger = LangflowClient::new(sim.url(), Some("sk-wrong".into()));
    let err = stranger.run("echo", &request("x", "s")).await.unwrap_err();
    assert!(matches!(err, LangflowError::Forbidden { .. }), "{err:?}");
    assert!(!format!("{stranger:?}").contains("sk-wrong"));

    let err = client.run("fail", &request("boom", "s")).await.unwrap_err();
    let LangflowError::Server {
        status, ref detail, ..
    } = err
    else {
        panic!("expected a server error, got {err:?}");
    };
    assert_eq!(status, 500);
    assert!(detail.contains("Error running graph"), "{detail}");
    assert!(!err.is_retryable());

    let err = client
        .run_stream("fail", &request("boom", "s"), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, LangflowError::Flow { .. }), "{err:?}");

    // Both input_value and a Chat Input tweak setting it: LangFlow's 400.
    let mut conflicting = request("x", "s");
    conflicting
        .tweaks
        .insert("ChatInput-aaaa1".into(), json!({"input_value": "y"}));
    let err = client.run("echo", &conflicting).await.unwrap_err();
    assert!(matches!(err, LangflowError::BadRequest { .. }), "{err:?}");
    sim.stop().await;
}

#[actix_rt::test]
async fn visual_job_uploads_and_attaches_files() {
    let (sim, client) = start().await;
    let image = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/rec_input.png");
    let flow = FlowConfig {
        id: flow_id(&sim, "narration-visual"),
        file_component: Some("ChatInput-aaaa1".into()),
    };
    let mut tweaks = Map::new();
    // Would conflict with input_value: the step input wins and this field is dropped.
    tweaks.insert("ChatInput-aaaa1".into(), json!({"input_value": "ignored"}));
    let job = LangflowJob {
        flow: "narration-visual".into(),
        input_value: "a quiet harbour".into(),
        input_type: "chat".into(),
        output_type: "chat".into(),
        tweaks,
        files: vec![image],
    };
    let text = run_job(&client, &job, &flow, "sess-5", |_| {})
        .await
        .expect("visual narration");
    assert!(text.contains("32x24"), "{text}");

    let no_component = FlowConfig {
        file_component: None,
        ..flow
    };
    let err = run_job(&client, &job, &no_component, "sess-6", |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, LangflowError::NoFileComponent { .. }),
        "{err:?}"
    );
    sim.stop().await;
}
