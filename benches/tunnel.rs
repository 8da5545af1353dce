//! Throughput of an SSH tunnel: a 256 MiB body read through a daemon's tunnel to a local
//! OpenSSH server, and the same body read directly over loopback, side by side.
//!
//! `cargo bench --bench tunnel` (needs /usr/sbin/sshd). Prints one line per way and the
//! ratio; docs/tunnels.md keeps the figures.

#[allow(dead_code)]
#[path = "../tests/tunnel/sshd.rs"]
mod sshd;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use multiplex::daemon::{DaemonOptions, DaemonThread};
use multiplex_sim::comfyui::{ComfySim, ComfySimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size of the body moved each round.
const BODY: usize = 256 * 1024 * 1024;
/// Rounds per way; the best one is reported (the others only warm up or wobble).
const ROUNDS: usize = 3;
/// Longest the bench waits for the tunnel to come up.
const PATIENCE: Duration = Duration::from_secs(60);

/// Serves `BODY` bytes to every connection, then closes it.
async fn blob_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let chunk = vec![0x5au8; 256 * 1024];
        while let Ok((mut socket, _)) = listener.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let mut left = BODY;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if socket.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// Reads one whole body from `addr`; answers the seconds it took.
async fn fetch(addr: SocketAddr) -> f64 {
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = socket.read(&mut buffer).await.unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, BODY, "the whole body arrived");
    started.elapsed().as_secs_f64()
}

async fn best_of(addr: SocketAddr) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        best = best.min(fetch(addr).await);
    }
    best
}

/// The blob forward's local end, once the tunnel is up.
async fn wait_tunnel(api: &str) -> SocketAddr {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let body: serde_json::Value = reqwest::get(format!("{api}/api/tunnels"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let tunnel = &body["tunnels"][0];
        if tunnel["state"] == "up" {
            let forwards = tunnel["forwards"].as_array().unwrap();
            let blob = forwards.iter().find(|f| f["name"] == "blob").unwrap();
            return blob["local"].as_str().unwrap().parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the tunnel never came up: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn main() {
    actix_rt::System::new().block_on(async {
        let sshd = sshd::Sshd::start();
        let comfy = ComfySim::start(ComfySimConfig::default(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let blob = blob_server().await;
        let config = format!(
            "[[nodes]]\nname = \"box\"\n[nodes.comfyui]\nforward = \"comfyui\"\n\
             [nodes.ssh]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nkey_file = \"{}\"\n\
             known_hosts = \"{}\"\n\
             [[nodes.ssh.forwards]]\nname = \"comfyui\"\nremote = \"{}\"\n\
             [[nodes.ssh.forwards]]\nname = \"blob\"\nremote = \"{blob}\"\n",
            sshd.port,
            sshd.user,
            sshd.client_key.display(),
            sshd.known_hosts.display(),
            comfy.addr(),
        );
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("multiplex.toml");
        std::fs::write(&config_path, config).unwrap();
        let daemon = DaemonThread::spawn(DaemonOptions {
            config: Some(config_path),
            bind: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.path().join("data")),
            ..DaemonOptions::default()
        })
        .unwrap();
        let local = wait_tunnel(&format!("http://{}", daemon.addr)).await;

        let direct = best_of(blob).await;
        let tunnelled = best_of(local).await;
        let mib = (BODY / (1024 * 1024)) as f64;
        let report = format!(
            "body {mib} MiB, best of {ROUNDS}\n\
             direct loopback: {:>8.1} MiB/s ({direct:.2} s)\n\
             through tunnel:  {:>8.1} MiB/s ({tunnelled:.2} s)\n\
             tunnel / direct: {:>8.3}\n",
            mib / direct,
            mib / tunnelled,
            direct / tunnelled,
        );
        // A bench prints its figures; stdout is where cargo bench shows them.
        std::io::Write::write_all(&mut std::io::stdout(), report.as_bytes()).unwrap();
        daemon.stop().await;
        comfy.stop().await;
    });
}
