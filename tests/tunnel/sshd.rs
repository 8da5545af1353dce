//! A real OpenSSH server on a loopback port, for tests and the tunnel benchmark.
//!
//! Everything lives in a temporary folder: a generated host key and sshd_config, a client
//! key listed in the folder's authorized_keys, a known_hosts naming the host key, the pid
//! file and the server's log. The server runs in a process group of its own, so
//! [`Sshd::kill`] takes the per-connection processes down with it, as a crash of the box
//! would.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's openssh-server installs the daemon (`.ci/run` installs it).
const SSHD: &str = "/usr/sbin/sshd";
/// Longest wait for the server to answer with its banner.
const START_PATIENCE: Duration = Duration::from_secs(20);

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// A key the server accepts.
    pub client_key: PathBuf,
    /// Lists the server's current host key under `[127.0.0.1]:port`.
    pub known_hosts: PathBuf,
    pub user: String,
    child: Option<Child>,
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen runs");
    assert!(status.success(), "ssh-keygen failed for {}", path.display());
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

impl Sshd {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> Sshd {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let host_key = dir.path().join("host_ed25519");
        let client_key = dir.path().join("client_ed25519");
        keygen(&host_key);
        keygen(&client_key);
        std::fs::copy(
            dir.path().join("client_ed25519.pub"),
            dir.path().join("authorized_keys"),
        )
        .expect("authorized_keys is written");
        // sshd refuses to start without its privilege-separation directory.
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd exists or can be made");
        let mut sshd = Sshd {
            known_hosts: dir.path().join("known_hosts"),
            port: free_port(),
            client_key,
            user: current_user(),
            dir,
            child: None,
        };
        sshd.write_config();
        sshd.write_known_hosts();
        sshd.spawn();
        sshd
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn host_key(&self) -> PathBuf {
        self.dir.path().join("host_ed25519")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The host key's fingerprint as `ssh-keygen -l` prints it (`SHA256:...`).
    pub fn fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.host_key())
            .output()
            .expect("ssh-keygen runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .nth(1)
            .expect("ssh-keygen prints a fingerprint")
            .to_string()
    }

    /// A key the server does not accept.
    pub fn stranger_key(&self) -> PathBuf {
        let path = self.dir.path().join("stranger_ed25519");
        if !path.exists() {
            keygen(&path);
        }
        path
    }

    fn write_config(&self) {
        let dir = self.dir.path().display();
        let config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {dir}/host_ed25519\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             StrictModes no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\n\
             PermitOpen any\n\
             MaxStartups 100\n\
             MaxSessions 100\n\
             LogLevel VERBOSE\n",
            port = self.port,
        );
        std::fs::write(self.dir.path().join("sshd_config"), config).expect("config written");
    }

    /// Lists the current host key under `[127.0.0.1]:port`.
    pub fn write_known_hosts(&self) {
        let public = std::fs::read_to_string(self.dir.path().join("host_ed25519.pub"))
            .expect("the host key's public half");
        let key: Vec<&str> = public.split_whitespace().take(2).collect();
        let line = format!("[127.0.0.1]:{} {}\n", self.port, key.join(" "));
        std::fs::write(&self.known_hosts, line).expect("known_hosts written");
    }

    /// Replaces the host key (known_hosts keeps the old one) and restarts the server.
    pub fn change_host_key(&mut self) {
        self.kill();
        let key = self.host_key();
        std::fs::remove_file(&key).expect("old host key removed");
        std::fs::remove_file(key.with_extension("pub")).ok();
        std::fs::remove_file(self.dir.path().join("host_ed25519.pub")).ok();
        keygen(&key);
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("the log file opens");
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("sshd starts (is openssh-server installed?)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if let Ok(mut stream) = TcpStream::connect(self.addr()) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut banner = [0u8; 7];
                if stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-2.0" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not answer on {}; log:\n{}",
                self.addr(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server and every session process. Sessions call setsid, so they leave the
    /// server's process group: they are found as its descendants in /proc.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut doomed = descendants(child.id());
        doomed.push(child.id());
        let pids: Vec<String> = doomed.iter().map(u32::to_string).collect();
        let _ = Command::new("kill").arg("-KILL").args(&pids).status();
        let _ = child.wait();
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) every session process, leaving the listener
    /// alone: a frozen session is a black-holed link, silent but not closed.
    pub fn signal_sessions(&self, signal: &str) {
        let Some(child) = self.child.as_ref() else {
            return;
        };
        let pids: Vec<String> = descendants(child.id()).iter().map(u32::to_string).collect();
        if pids.is_empty() {
            return;
        }
        let _ = Command::new("kill").arg(signal).args(&pids).status();
    }

    /// Adds a key protected by `passphrase` to authorized_keys and returns its path.
    pub fn passphrase_key(&self, passphrase: &str) -> PathBuf {
        let path = self.dir.path().join("locked_ed25519");
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", passphrase, "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen runs");
        assert!(status.success());
        let public = std::fs::read_to_string(path.with_extension("pub")).expect("public key");
        let authorized = self.dir.path().join("authorized_keys");
        let mut keys = std::fs::read_to_string(&authorized).unwrap_or_default();
        keys.push_str(&public);
        std::fs::write(&authorized, keys).expect("authorized_keys written");
        path
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// Every process below `root`, from the parent pids in /proc/*/stat.
fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name is in parentheses and may hold spaces: fields follow the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parents.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(pid, _)| *pid),
        );
        index += 1;
    }
    found.remove(0);
    found
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}
