//! The client against a scripted stand-in daemon over real sockets: following a run through
//! a dropped socket and a `missed` frame, falling back to polling, and the error messages a
//! person sees when the daemon refuses or is not there at all.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::follow::{follow_run_with, FollowOptions};
use super::progress::StepDisplay;
use super::test_server::{self, Action, State};
use super::{render, DaemonClient, DaemonError};

/// Sends the client's tracing to the test's captured output (shown when a test fails).
fn trace() {
    let filter = tracing_subscriber::EnvFilter::new("multiplex=debug");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Timings small enough that retries cost nothing; correctness never depends on them.
///
/// Pings go out often because a dropped socket is sometimes only noticed when the client
/// writes: after `Action::Drop` actix-web may keep the TCP connection open until then, as a
/// half-open connection through a dead tunnel would.
fn fast() -> FollowOptions {
    FollowOptions {
        connect_timeout: Duration::from_secs(5),
        ping_every: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(10),
        retry_min: Duration::from_millis(1),
        retry_max: Duration::from_millis(5),
        give_up_after: Duration::from_secs(10),
    }
}

/// A `Write` whose bytes the test can read afterwards.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn position(lines: &[String], needle: &str) -> usize {
    lines
        .iter()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in {lines:#?}"))
}

/// A run view with one image step in the given states.
fn view(run_state: &str, step_state: &str, node: Option<&str>) -> Value {
    let artifacts = if step_state == "succeeded" {
        json!([{"id": "ab12cd", "kind": "image", "mime": "image/png", "size": 2048,
                "filename": "still.png", "url": "/api/artifacts/ab12cd"}])
    } else {
        json!([])
    };
    let finished_at = if run_state == "succeeded" {
        json!("2025-01-31T14:00:30Z")
    } else {
        json!(null)
    };
    json!({
        "id": "r1", "name": "lighthouse", "state": run_state,
        "created_at": "2025-01-31T14:00:00Z",
        "finished_at": finished_at,
        "error": null,
        "steps": [{"id": "still", "kind": "image", "state": step_state, "node": node,
                   "attempts": 1, "queued_at": "2025-01-31T14:00:00Z",
                   "started_at": "2025-01-31T14:00:02Z", "finished_at": null,
                   "progress": null, "error": null, "artifacts": artifacts}]
    })
}

fn event(seq: u64, kind: &str, fields: Value) -> Value {
    let mut event = json!({"seq": seq, "at": "2025-01-31T14:00:01Z", "type": kind, "run_id": "r1"});
    if let (Some(event), Some(fields)) = (event.as_object_mut(), fields.as_object()) {
        event.extend(fields.clone());
    }
    event
}

#[actix_web::test]
async fn follow_survives_a_dropped_socket_and_a_missed_frame() {
    trace();
    let running = view("running", "running", Some("box1"));
    let still_done = view("running", "succeeded", Some("box1"));
    let finished = view("succeeded", "succeeded", Some("box1"));

    let first_socket = vec![
        Action::Send(json!({"type": "subscribed", "run_id": "r1", "seq": 0})),
        Action::Send(event(1, "run_state", json!({"state": "running"}))),
        Action::Send(event(
            2,
            "step_state",
            json!({"step_id": "still", "state": "assigned", "node": "box1", "attempt": 1}),
        )),
        Action::Send(event(
            3,
            "step_progress",
            json!({"step_id": "still", "node": "box1", "value": 10, "max": 20}),
        )),
        Action::Send(event(
            4,
            "step_notice",
            json!({"step_id": "still", "message": "loading flux"}),
        )),
        Action::Drop,
    ];
    // After the reconnect the daemon replays seq 4 again (overlap must be ignored), then
    // admits it dropped events: the step's success is only visible through REST. The client
    // fetches REST after `subscribed`, after `missed` and once at the end, in that order.
    let second_socket = vec![
        Action::SetRuns(vec![running.clone(), still_done, finished.clone()]),
        Action::Send(json!({"type": "subscribed", "run_id": "r1", "seq": 4})),
        Action::Send(event(
            4,
            "step_notice",
            json!({"step_id": "still", "message": "loading flux"}),
        )),
        Action::Send(json!({"type": "missed", "count": 2})),
        Action::Send(event(7, "run_state", json!({"state": "succeeded"}))),
    ];
    let server = test_server::start(State {
        runs: vec![view("running", "queued", None)].into(),
        sockets: vec![first_socket, second_socket].into(),
        ..State::default()
    });

    let client = DaemonClient::new(server.base.clone());
    let out = Captured::default();
    let mut display = StepDisplay::plain(Box::new(out.clone()));
    let run = follow_run_with(&client, "r1", &fast(), &mut display)
        .await
        .unwrap();

    assert_eq!(run, finished);
    let subscribes = server.state().subscribes.clone();
    assert_eq!(
        subscribes,
        [
            json!({"type": "subscribe", "run_id": "r1"}),
            json!({"type": "subscribe", "run_id": "r1", "since": 4})
        ]
    );

    let lines = out.lines();
    let placed = position(&lines, "still (image): placed on box1");
    let running_at = position(&lines, "still (image): running on box1");
    let half = position(&lines, "still (image): 50%");
    let done = position(&lines, "still (image): done, 1 artifact");
    let ended = position(&lines, "run succeeded");
    assert!(
        placed < running_at && running_at < half && half < done && done < ended,
        "{lines:#?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("loading flux")).count(),
        1,
        "{lines:#?}"
    );
}

#[actix_web::test]
async fn follow_polls_rest_when_the_socket_is_unavailable() {
    let finished = view("succeeded", "succeeded", Some("box2"));
    let server = test_server::start(State {
        runs: vec![
            view("queued", "queued", None),
            view("running", "running", Some("box2")),
            finished.clone(),
        ]
        .into(),
        ..State::default()
    });

    let client = DaemonClient::new(server.base.clone());
    let out = Captured::default();
    let mut display = StepDisplay::plain(Box::new(out.clone()));
    let run = follow_run_with(&client, "r1", &fast(), &mut display)
        .await
        .unwrap();

    assert_eq!(run, finished);
    let lines = out.lines();
    assert!(position(&lines, "running on box2") < position(&lines, "done, 1 artifact"));
    assert!(server.state().requests.iter().any(|r| r == "GET /ws"));
}

#[actix_web::test]
async fn follow_rides_out_connections_cut_mid_request() {
    trace();
    let finished = view("succeeded", "succeeded", Some("box2"));
    let server = test_server::start(State {
        runs: vec![view("running", "running", Some("box2")), finished.clone()].into(),
        cut_runs: 1,
        ..State::default()
    });
    let client = DaemonClient::new(server.base.clone());

    // One cut answer on its own: a transient error naming the request.
    let err = client.run("r1").await.unwrap_err();
    let daemon_error = err.downcast_ref::<DaemonError>();
    assert!(
        daemon_error.is_some_and(DaemonError::is_transient),
        "a cut connection should be transient: {err:#}"
    );
    assert!(format!("{err:#}").contains("GET "), "{err:#}");

    // While following, cut answers are waited out like a restarting daemon.
    server.state().cut_runs = 3;
    let mut display = StepDisplay::plain(Box::new(std::io::sink()));
    let run = follow_run_with(&client, "r1", &fast(), &mut display)
        .await
        .unwrap();
    assert_eq!(run, finished);
    assert_eq!(server.state().cut_runs, 0);
}

#[actix_web::test]
async fn follow_stops_on_an_unknown_run() {
    let server = test_server::start(State {
        sockets: vec![vec![Action::Send(
            json!({"type": "error", "error": "not_found", "message": "no run r1"}),
        )]]
        .into(),
        ..State::default()
    });
    let client = DaemonClient::new(server.base.clone());
    let mut display = StepDisplay::plain(Box::new(std::io::sink()));
    let err = follow_run_with(&client, "r1", &fast(), &mut display)
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("following run r1") && text.contains("no such run"),
        "{text}"
    );
}

#[actix_web::test]
async fn a_refused_workflow_lists_every_issue_on_its_own_line() {
    let server = test_server::start(State {
        submit_answer: Some((
            400,
            json!({
                "error": "invalid_workflow",
                "message": "2 problems in the workflow",
                "issues": [
                    {"code": "invalid_param", "node": "still", "edge": null, "field": "data.width",
                     "message": "must be a positive integer"},
                    {"code": "missing_node", "node": null, "edge": "e4", "field": "target",
                     "message": "no node named \"nope\""},
                ]
            }),
        )),
        ..State::default()
    });
    let client = DaemonClient::new(server.base.clone());
    let err = client
        .submit(&json!({"name": "x", "nodes": [], "edges": []}))
        .await
        .unwrap_err();

    let api = err
        .downcast_ref::<DaemonError>()
        .expect("a DaemonError inside");
    assert!(!api.is_transient());
    let text = format!("{err:#}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains("2 problems in the workflow (400 invalid_workflow)"),
        "{text}"
    );
    assert!(lines[0].contains("/api/workflows"), "{text}");
    assert_eq!(
        lines[1],
        r#"  - node "still", field "data.width": must be a positive integer [invalid_param]"#
    );
    assert_eq!(
        lines[2],
        r#"  - edge "e4", field "target": no node named "nope" [missing_node]"#
    );
}

#[actix_web::test]
async fn other_daemon_errors_show_their_message() {
    let server = test_server::start(State::default());
    let client = DaemonClient::new(server.base.clone());
    let err = client.cancel("r 1/..").await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("run already ended (409 run_ended)"), "{text}");
    assert!(text.starts_with("cancelling run r 1/.."), "{text}");
    // The id is one percent-encoded path segment, whatever it contains.
    let requests = server.state().requests.clone();
    assert_eq!(requests, ["POST /api/workflows/r%201%2F../cancel"]);
}

#[actix_web::test]
async fn lists_pass_their_limit_and_keep_a_path_prefix() {
    let server = test_server::start(State {
        list: json!({"runs": []}),
        ..State::default()
    });
    let client = DaemonClient::new(server.base.clone());
    assert_eq!(client.runs(7).await.unwrap(), json!({"runs": []}));
    assert_eq!(server.state().requests, ["GET /api/workflows?limit=7"]);

    let prefixed = DaemonClient::new(server.base.join("multiplex").unwrap());
    assert_eq!(
        prefixed.url(&["api", "nodes"]).path(),
        "/multiplex/api/nodes"
    );
    assert_eq!(prefixed.ws_url().scheme(), "ws");
    assert_eq!(prefixed.ws_url().path(), "/multiplex/ws");
}

#[actix_web::test]
async fn a_daemon_that_is_not_running_is_named_with_a_hint() {
    // Bind and release a port so that nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = url::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap();
    let client = DaemonClient::new(base);
    let err = client.nodes().await.unwrap_err();
    let text = format!("{err:#}");
    let expected = format!("cannot reach the multiplex daemon at http://127.0.0.1:{port}/: ");
    assert!(text.contains(&expected), "{text}");
    assert!(text.ends_with("(is `multiplex serve` running?)"), "{text}");
    assert!(err
        .downcast_ref::<DaemonError>()
        .is_some_and(DaemonError::is_transient));
}

#[test]
fn tables_render_sample_answers() {
    let runs = json!({"runs": [
        view("succeeded", "succeeded", Some("box1")),
        {"id": "r2", "state": "failed", "error": "step clip failed: out of memory", "steps": []},
    ]});
    let table = render::runs_table(&runs);
    assert!(table.contains("lighthouse") && table.contains("30.0s") && table.contains("1/1"));
    assert!(table.contains("out of memory"), "{table}");

    let run = render::run_table(&view("running", "running", Some("box1")));
    assert!(run.starts_with("run r1 \"lighthouse\": running"), "{run}");
    assert!(run.contains("box1") && run.contains("2.0s"), "{run}");

    let nodes = json!({"nodes": [
        {"name": "box1", "os": "windows", "available": true, "slots": 2, "free_slots": 1,
         "running": ["r1/clip"], "services": ["comfyui"], "capabilities": ["video"],
         "gpus": ["RTX A6000"], "vram_mb": 49152, "recent_models": ["wan2.1-i2v"]},
        {"name": "box3", "available": false, "reason": "tunnel down"},
    ]});
    let table = render::nodes_table(&nodes);
    for needle in [
        "box1",
        "1/2 free",
        "RTX A6000",
        "48.0 GiB",
        "wan2.1-i2v",
        "down: tunnel down",
    ] {
        assert!(table.contains(needle), "{needle} missing in\n{table}");
    }
}

#[test]
fn tunnels_table_shows_state_channels_bytes_forwards_and_error() {
    let tunnels = json!({"tunnels": [
        {"node": "box5", "target": "multiplex@192.0.2.15:22", "state": "up",
         "since": "2025-01-31T14:00:00Z", "reconnects": 2, "open_channels": 3,
         "channel_failures": 1, "bytes_sent": 2048, "bytes_received": 5_242_880,
         "forwards": [{"name": "comfyui", "local": "127.0.0.1:40001",
                       "remote": "127.0.0.1:8188"}]},
        {"node": "box6", "target": "multiplex@192.0.2.16:22", "state": "failed",
         "last_error": "host key of 192.0.2.16:22 has changed", "forwards": []},
    ]});
    let table = render::tunnels_table(&tunnels);
    for needle in [
        "box5",
        "multiplex@192.0.2.15:22",
        "3 open, 1 failed",
        "5.0 MiB",
        "comfyui 127.0.0.1:40001 -> 127.0.0.1:8188",
        "failed",
        "has changed",
    ] {
        assert!(table.contains(needle), "{needle} missing in\n{table}");
    }
    assert_eq!(
        render::tunnels_table(&json!({"tunnels": []})),
        "no tunnels configured"
    );
}

#[test]
fn summary_names_each_artifact_by_url_and_path() {
    let mut run = view("succeeded", "succeeded", Some("box1"));
    run["steps"][0]["finished_at"] = json!("2025-01-31T14:00:20Z");
    let base = url::Url::parse("http://127.0.0.1:7700/").unwrap();
    let text = render::run_summary(&run, Some(&base), Some(std::path::Path::new("/srv/mx")));
    assert!(
        text.starts_with("run r1 \"lighthouse\": succeeded, took 30.0s"),
        "{text}"
    );
    assert!(
        text.contains("still (image): succeeded on box1, waited 2.0s, ran 18.0s"),
        "{text}"
    );
    assert!(
        text.contains("http://127.0.0.1:7700/api/artifacts/ab12cd"),
        "{text}"
    );
    assert!(text.contains("/srv/mx/artifacts/ab/ab12cd"), "{text}");
}

#[test]
fn odd_json_renders_dashes_instead_of_panicking() {
    let base = url::Url::parse("http://127.0.0.1:7700/").unwrap();
    let dir = std::path::Path::new("/srv/mx");
    for odd in [
        json!(null),
        json!("text"),
        json!([1, 2]),
        json!({"runs": "no"}),
        json!({"runs": [null, 3, {"steps": [null, {"artifacts": [null, {"id": "../x"}]}]}]}),
        json!({"nodes": [{"available": "yes", "slots": -1, "gpus": [{"name": "A"}, 4]}]}),
        json!({"id": 5, "steps": [{"error": {"details": {"trace": [1, 2]}}, "progress": "x"}]}),
    ] {
        render::runs_table(&odd);
        render::run_table(&odd);
        render::nodes_table(&odd);
        render::tunnels_table(&odd);
        let summary = render::run_summary(&odd, Some(&base), Some(dir));
        assert!(!summary.contains("../x"), "{summary}");
    }
    let bare = render::run_table(&json!({}));
    assert!(bare.starts_with("run -: -"), "{bare}");
}

/// Names, ids, reasons and errors come from workflow documents and remote services: none
/// may reach the terminal as a control character (an ESC sequence could rewrite the screen,
/// a newline or carriage return forge a line).
#[test]
fn control_characters_from_the_daemon_are_shown_escaped() {
    let evil = "a\u{1b}[2J\u{0}b\r\nc\u{9b}d\u{202e}e";
    let mut run = view("failed", "failed", Some(evil));
    run["id"] = json!(evil);
    run["name"] = json!(evil);
    run["error"] = json!(evil);
    run["steps"][0]["id"] = json!(evil);
    run["steps"][0]["error"] = json!({"message": evil, "details": {"trace": evil}});
    run["steps"][0]["artifacts"] = json!([{"id": "ab12", "kind": evil, "filename": evil}]);
    let nodes = json!({"nodes": [{"name": evil, "available": false, "reason": evil,
                                  "services": [evil], "gpus": [{"name": evil}]}]});
    let base = url::Url::parse("http://127.0.0.1:7700/").unwrap();
    let outputs = [
        render::runs_table(&json!({"runs": [run.clone()]})),
        render::run_table(&run),
        render::nodes_table(&nodes),
        render::run_summary(&run, Some(&base), None),
    ];
    for text in &outputs {
        let bad: Vec<char> = text
            .chars()
            .filter(|c| *c != '\n' && (c.is_control() || *c == '\u{202e}'))
            .collect();
        assert!(bad.is_empty(), "control characters {bad:?} in\n{text}");
        assert!(
            text.contains(r"a\u{1b}[2J\u{0}b\r\nc\u{9b}d\u{202e}e"),
            "{text}"
        );
    }
    // The forged newline did not start a line of its own.
    assert!(
        outputs[3].lines().all(|line| !line.starts_with('c')),
        "{}",
        outputs[3]
    );

    let err = DaemonError::from_answer(
        "GET /x".into(),
        reqwest::StatusCode::BAD_GATEWAY,
        evil.as_bytes(),
    );
    assert!(!err.to_string().contains('\u{1b}'), "{err}");

    let out = Captured::default();
    let mut display = StepDisplay::plain(Box::new(out.clone()));
    let mut tracker = super::progress::Tracker::new("r1");
    display.show(&tracker.snapshot(&run));
    display.finish();
    let shown = out.lines().join("\n");
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\r'),
        "{shown}"
    );
}
