//! Forwarded connections: many at once, a forward whose target is closed, a remote end that
//! hangs up.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::sshd::Sshd;
use super::*;

#[actix_rt::test]
async fn fifty_parallel_downloads_through_one_tunnel_all_complete() {
    let sshd = Sshd::start();
    let comfy = comfy_sim(1).await;
    let daemon = daemon(&comfy_node("gpu", &sshd, comfy.addr(), &[]));
    let view = wait_tunnel(&daemon, "gpu", |t| t["state"] == "up").await;
    let base = format!("http://{}", local_end(&view, "comfyui"));

    // A 512 KiB input file, uploaded through the tunnel.
    let content: Vec<u8> = (0..512 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(content.clone()).file_name("blob.png"),
    );
    let http = reqwest::Client::new();
    let uploaded: Value = http
        .post(format!("{base}/upload/image"))
        .multipart(form)
        .send()
        .await
        .expect("the upload is answered")
        .json()
        .await
        .expect("the upload answer is JSON");
    let name = uploaded["name"]
        .as_str()
        .expect("a stored name")
        .to_string();

    let downloads = (0..50).map(|_| {
        let (http, url) = (
            http.clone(),
            format!("{base}/view?filename={name}&type=input"),
        );
        async move {
            let response = http.get(url).send().await.expect("the download starts");
            assert_eq!(response.status(), 200);
            response.bytes().await.expect("the download completes")
        }
    });
    let bodies = futures_util::future::join_all(downloads).await;
    assert_eq!(bodies.len(), 50);
    for body in bodies {
        assert!(
            body[..] == content[..],
            "a download differs from the upload"
        );
    }
    let view = tunnel(&daemon, "gpu").await;
    assert!(
        view["bytes_received"].as_u64() >= Some(50 * 512 * 1024),
        "{view}"
    );
    assert_eq!(view["channel_failures"], 0, "{view}");
    daemon.daemon.stop().await;
}

#[actix_rt::test]
async fn a_forward_to_a_closed_port_fails_alone() {
    let sshd = Sshd::start();
    let comfy = comfy_sim(1).await;
    // A port nothing listens on, on the box's side.
    let closed = std::net::TcpListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap();
    let daemon = daemon(&comfy_node("gpu", &sshd, comfy.addr(), &[("dead", closed)]));
    let view = wait_tunnel(&daemon, "gpu", |t| t["state"] == "up").await;
    let dead = local_end(&view, "dead");
    let base = format!("http://{}", local_end(&view, "comfyui"));
    let http = reqwest::Client::new();

    // Connections to the dead forward end (closed or reset), while the other forward of
    // the same session keeps serving.
    let attempts = (0..5).map(|_| async move {
        // The reset can come before the connect call has even returned.
        let mut socket = match tokio::net::TcpStream::connect(dead).await {
            Ok(socket) => socket,
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(err) => panic!("the dead forward's local end does not accept: {err}"),
        };
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(PATIENCE, socket.read(&mut buffer)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the dead forward carried data"
        );
    });
    let requests = (0..5).map(|_| {
        let http = http.clone();
        let url = format!("{base}/system_stats");
        async move {
            http.get(url)
                .send()
                .await
                .expect("answered")
                .status()
                .as_u16()
        }
    });
    let (_, statuses) = futures_util::future::join(
        futures_util::future::join_all(attempts),
        futures_util::future::join_all(requests),
    )
    .await;
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");

    let view = tunnel(&daemon, "gpu").await;
    assert_eq!(view["state"], "up", "{view}");
    assert!(view["channel_failures"].as_u64() >= Some(5), "{view}");
    daemon.wait_nodes_available().await;
    daemon.daemon.stop().await;
}

/// Answers each connection with one HTTP response, then hangs up without saying so in a
/// header (as a server restarting, or one with a short keep-alive, does).
async fn hang_up_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                let _ = socket.read(&mut buffer).await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                let _ = socket.write_all(answer).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

#[actix_rt::test]
async fn a_connection_closed_by_the_remote_service_is_closed_locally() {
    let sshd = Sshd::start();
    let comfy = comfy_sim(1).await;
    let hang_up = hang_up_server().await;
    let daemon = daemon(&comfy_node(
        "gpu",
        &sshd,
        comfy.addr(),
        &[("hangup", hang_up)],
    ));
    let view = wait_tunnel(&daemon, "gpu", |t| t["state"] == "up").await;
    let local = local_end(&view, "hangup");

    // A raw client reads the answer and then the end of the stream, not silence.
    let mut socket = tokio::net::TcpStream::connect(local).await.unwrap();
    socket
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, socket.read_to_end(&mut answer))
        .await
        .expect("the local end closes when the remote one does")
        .unwrap();
    assert!(
        answer.ends_with(b"ok"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A pooled HTTP client: once the remote end hung up (the channel is gone), the pooled
    // connection is seen closed and the next request goes out on a new one, answered.
    // (Reusing it in the instant between the answer and the hang-up arriving would be the
    // same race as with the server reached directly.)
    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    for _ in 0..5 {
        let request = http.get(format!("http://{local}/")).send();
        let response = tokio::time::timeout(PATIENCE, request)
            .await
            .expect("no request hangs on a closed connection")
            .expect("answered");
        assert_eq!(response.text().await.unwrap(), "ok");
        wait_tunnel(&daemon, "gpu", |t| {
            let hangup = t["forwards"]
                .as_array()
                .and_then(|f| f.iter().find(|f| f["name"] == "hangup"));
            hangup.is_some_and(|f| f["open_channels"] == 0)
        })
        .await;
    }
    let view = tunnel(&daemon, "gpu").await;
    assert!(view["channels_opened"].as_u64() >= Some(6), "{view}");
    daemon.daemon.stop().await;
}
