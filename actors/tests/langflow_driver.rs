//! The LangFlow driver against the LangFlow simulator, over real sockets.
//!
//! Guards the run contract (our session id sent and echoed, the text found in the answer),
//! streaming (tokens as they come, text from `end`, flows without tokens), file attachment
//! for visual narration, and the mapping of LangFlow's error answers. The `recover_*` tests
//! guard exactly-once across restarts: a run that already answered (even behind a proxy's
//! 503) is read back from LangFlow's stored messages, never run a second time.

use std::net::SocketAddr;
use std::path::PathBuf;

use multiplex_actors::config::FlowConfig;
use multiplex_actors::langflow::{
    recover_job, recover_job_within, run_job, LangflowClient, LangflowError, Recovery, RunRequest,
};
use multiplex_actors::workflow::LangflowJob;
use multiplex_sim::langflow::{LangflowControl, LangflowSim, LangflowSimConfig};
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

fn echo_job(input: &str) -> LangflowJob {
    LangflowJob {
        flow: "echo".into(),
        input_value: input.into(),
        input_type: "chat".into(),
        output_type: "chat".into(),
        tweaks: Map::new(),
        files: Vec::new(),
    }
}

fn echo_flow(sim: &LangflowSim) -> FlowConfig {
    FlowConfig {
        id: flow_id(sim, "echo"),
        file_component: None,
    }
}

/// Polls every 10 ms for up to 10 s until LangFlow has stored a message for the session.
async fn until_asked(client: &LangflowClient, session: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let messages = client.session_messages(session).await.expect("messages");
        if messages.iter().any(|m| m.is_user()) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no user message");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[actix_rt::test]
async fn recover_reads_a_finished_run_back() {
    let (sim, client) = start().await;
    let (job, flow) = (echo_job("said once"), echo_flow(&sim));
    let text = run_job(&client, &job, &flow, "sess-r1", |_| {})
        .await
        .expect("run");
    let messages = client.session_messages("sess-r1").await.expect("messages");
    assert_eq!(messages.len(), 2);
    assert!(messages[0].is_user() && messages[1].is_answer());

    let recovered = recover_job(&client, &job, &flow, "sess-r1").await.unwrap();
    assert_eq!(recovered, Recovery::Finished(text));
    // By endpoint name too: messages carry only the flow's UUID.
    let by_name = FlowConfig {
        id: "echo".into(),
        file_component: None,
    };
    let recovered = recover_job(&client, &job, &by_name, "sess-r1").await;
    assert_eq!(recovered.unwrap(), Recovery::Finished("said once".into()));

    let fresh = recover_job(&client, &job, &flow, "sess-never")
        .await
        .unwrap();
    assert_eq!(fresh, Recovery::NotStarted);
    assert_eq!(sim.runs_by_session().get("sess-r1"), Some(&1));
    assert!(sim.duplicate_sessions().is_empty());

    let stranger = LangflowClient::new(sim.url(), Some("sk-wrong".into()));
    let err = stranger.session_messages("sess-r1").await.unwrap_err();
    assert!(matches!(err, LangflowError::Forbidden { .. }), "{err:?}");
    sim.stop().await;
}

#[actix_rt::test]
async fn recover_waits_for_a_run_still_going() {
    let (sim, client) = start().await;
    sim.control(LangflowControl {
        run_delay_ms: Some(300),
        ..LangflowControl::default()
    });
    let (job, flow) = (echo_job("slow answer"), echo_flow(&sim));
    // The earlier daemon's run is still in flight when the new one looks.
    let earlier = run_job(&client, &job, &flow, "sess-r2", |_| {});
    let looking = async {
        until_asked(&client, "sess-r2").await;
        let wait = std::time::Duration::from_secs(10);
        recover_job_within(&client, &job, &flow, "sess-r2", wait).await
    };
    let (ran, recovered) = tokio::join!(earlier, looking);
    assert_eq!(ran.expect("run"), "slow answer");
    assert_eq!(
        recovered.expect("recovered"),
        Recovery::Finished("slow answer".into())
    );
    assert!(sim.duplicate_sessions().is_empty());
    sim.stop().await;
}

#[actix_rt::test]
async fn recover_gives_up_on_a_run_without_answer() {
    let (sim, client) = start().await;
    sim.control(LangflowControl {
        run_delay_ms: Some(60_000),
        ..LangflowControl::default()
    });
    let (job, flow) = (echo_job("never answered"), echo_flow(&sim));
    let stuck = run_job(&client, &job, &flow, "sess-r3", |_| {});
    let looking = async {
        until_asked(&client, "sess-r3").await;
        let wait = std::time::Duration::from_millis(300);
        let started = std::time::Instant::now();
        let recovered = recover_job_within(&client, &job, &flow, "sess-r3", wait).await;
        (recovered, started.elapsed())
    };
    // Dropping the stuck run closes its connection, which ends it in the simulator.
    let (recovered, took) = tokio::select! {
        ran = stuck => panic!("the run should still be going: {ran:?}"),
        looked = looking => looked,
    };
    assert_eq!(recovered.expect("recovered"), Recovery::Unfinished);
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    sim.stop().await;
}

#[actix_rt::test]
async fn recover_after_a_proxy_timeout_or_a_server_error() {
    let (sim, client) = start().await;
    sim.control(LangflowControl {
        fail_next_503: Some(1),
        fail_next_500: Some(1),
        ..LangflowControl::default()
    });
    let (job, flow) = (echo_job("behind a proxy"), echo_flow(&sim));
    let err = run_job(&client, &job, &flow, "sess-r4", |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, LangflowError::UnknownOutcome { status: 503, .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
    // The flow ran behind the proxy: its answer is read back, not produced again.
    let recovered = recover_job(&client, &job, &flow, "sess-r4").await.unwrap();
    assert_eq!(recovered, Recovery::Finished("behind a proxy".into()));

    let err = run_job(&client, &job, &flow, "sess-r5", |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, LangflowError::Server { status: 500, .. }),
        "{err:?}"
    );
    let err = recover_job(&client, &job, &flow, "sess-r5")
        .await
        .unwrap_err();
    assert!(matches!(err, LangflowError::Flow { .. }), "{err:?}");
    assert_eq!(sim.runs_by_session().get("sess-r4"), Some(&1));
    assert!(sim.duplicate_sessions().is_empty());
    sim.stop().await;
}
