//! Services that accept connections but never answer, over a real TCP listener.
//!
//! Guards against a node keeping its last "available" verdict because a health probe never
//! came back, probes piling up behind one another, and a job's history or queue check
//! waiting forever: every short REST call has a time limit, a probe runs one at a time, and a
//! probe that times out fails the node with a reason that says so.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use multiplex_actors::activity::ActivityHub;
use multiplex_actors::comfyui::{ComfyClient, ComfyError};
use multiplex_actors::config::{ComfyServiceConfig, NodeConfig};
use multiplex_actors::langflow::LangflowClient;
use multiplex_actors::node::GpuNode;
use multiplex_actors::scheduler::{ListNodes, RegisterNode, Scheduler};
use multiplex_actors::store::Store;
use tokio::io::AsyncReadExt;
use url::Url;

/// Longest the test waits for anything; a bound, never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(60);

/// A server that accepts every connection and reads what it is sent, but never answers and
/// never closes. Counts the `GET /system_stats` requests it saw.
async fn black_hole() -> (Url, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    let stats_requests = Arc::new(AtomicUsize::new(0));
    let counter = stats_requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                while let Ok(read) = stream.read(&mut buffer).await {
                    if read == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buffer[..read]);
                    while let Some(at) = find(&seen, b"GET /system_stats ") {
                        counter.fetch_add(1, Ordering::SeqCst);
                        seen.drain(..at + 1);
                    }
                }
                // Held until the peer gives up: never an answer, never a close from here.
                drop(stream);
            });
        }
    });
    (url, stats_requests)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The short calls a job's checks and the probes make all end, with an error that says they
/// timed out.
#[actix_rt::test]
async fn rest_calls_to_a_silent_server_time_out() {
    let (url, _) = black_hole().await;
    let comfy = ComfyClient::new(url.clone());
    let langflow = LangflowClient::new(url, Some("sk-test".into()));
    let calls = async {
        let (stats, queue, history, job, health) = futures_util::join!(
            comfy.system_stats(),
            comfy.queue(),
            comfy.history("p-1"),
            comfy.job("p-1"),
            langflow.health(),
        );
        let comfy_errors = [
            stats.map(|_| ()).unwrap_err(),
            queue.map(|_| ()).unwrap_err(),
            history.map(|_| ()).unwrap_err(),
            job.map(|_| ()).unwrap_err(),
        ];
        (comfy_errors, health.unwrap_err())
    };
    let (comfy_errors, health) = tokio::time::timeout(PATIENCE, calls)
        .await
        .expect("no call hangs");
    for err in comfy_errors {
        assert!(matches!(err, ComfyError::TimedOut { .. }), "{err}");
        assert!(err.is_transient(), "a timeout is worth retrying: {err}");
        assert!(err.to_string().contains("timed out"), "{err}");
    }
    assert!(health.to_string().contains("timed out"), "{health}");
    assert!(health.is_retryable(), "{health}");
}

/// A node whose ComfyUI never answers is unavailable with a reason that says it timed out,
/// and is probed one request at a time meanwhile.
#[actix_rt::test]
async fn a_node_whose_server_never_answers_is_unavailable_and_says_it_timed_out() {
    let (url, stats_requests) = black_hole().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store opens");
    let config = NodeConfig {
        name: "mute".into(),
        host: None,
        os: None,
        gpus: Vec::new(),
        slots: Some(1),
        comfyui: Some(ComfyServiceConfig {
            url,
            capabilities: vec!["image".into()],
            models: Vec::new(),
            forward: None,
        }),
        langflow: None,
        ssh: None,
    };
    let grace = Duration::from_secs(30);
    let scheduler = Scheduler::new(grace).start();
    let node = GpuNode::new(
        config.clone(),
        scheduler.clone(),
        ActivityHub::default().start(),
        store.artifacts().clone(),
        grace,
    )
    .start();
    scheduler
        .send(RegisterNode { config, addr: node })
        .await
        .expect("the scheduler answers");

    let deadline = Instant::now() + PATIENCE;
    let view = loop {
        let view = scheduler.send(ListNodes).await.expect("answers").remove(0);
        if view
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("timed out"))
        {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "the node never said it timed out: {:?}",
            view.reason
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!view.available);
    let reason = view.reason.unwrap_or_default();
    assert!(reason.starts_with("comfyui: "), "{reason}");
    // Probes come every 2 s; each waits up to 10 s. One at a time: the first, timed out by
    // now, and at most the one after it.
    let probes = stats_requests.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&probes),
        "{probes} probes sent to a server that never answered one"
    );
}
