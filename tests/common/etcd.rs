//! A real etcd for the control plane's tests: `/usr/bin/etcd` (Debian's 3.4) on free
//! loopback ports with a data directory of its own, as one server or a cluster of members
//! that a test can kill and restart. Ready means etcd's `/health` says so (which, for a
//! member of a cluster, needs a raft leader), never a guessed delay.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::free_port;
use super::process::{require, KillOnDrop};
use super::wait::wait_until;

pub const ETCD: &str = "/usr/bin/etcd";

/// How long etcd may take to elect a leader and answer /health (a shared 2-core machine).
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Client-side TLS for a member: etcd's server certificate and, with `client_auth`, the
/// demand for a client certificate signed by the same CA.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_auth: bool,
}

/// One etcd process and everything needed to start it again on the same ports and data.
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    initial_cluster: String,
    token: String,
    tls: Option<EtcdTls>,
    process: Option<KillOnDrop>,
}

impl EtcdMember {
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The client URL, as `--etcd-endpoints` takes it.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    fn command(&self) -> Command {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(ETCD);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key);
            if tls.client_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        cmd
    }

    fn spawn(&mut self) {
        let what = format!("etcd member {}", self.name);
        self.process = Some(KillOnDrop::spawn_group(
            &mut self.command(),
            &what,
            self.log.clone(),
        ));
    }

    /// Whether this member answers /health with `"health":"true"` (plain HTTP only: over
    /// TLS the TCP port accepting is the check, the test's own requests prove the rest).
    pub fn healthy(&mut self) -> Result<(), String> {
        if let Some(p) = self.process.as_mut() {
            if !p.running() {
                panic!(
                    "{} exited while awaited; its log:\n{}",
                    p.what,
                    super::tail(&p.stderr_text(), 30)
                );
            }
        }
        if self.tls.is_some() {
            return TcpStream::connect(("127.0.0.1", self.client_port))
                .map(drop)
                .map_err(|e| format!("connect: {e}"));
        }
        let body = http_get(self.client_port, "/health")?;
        if body.contains(r#""health":"true""#) {
            Ok(())
        } else {
            Err(format!("/health says {body:?}"))
        }
    }

    pub fn wait_healthy(&mut self) {
        let what = format!(
            "etcd member {} healthy on port {}",
            self.name, self.client_port
        );
        wait_until(START_DEADLINE, what, || self.healthy());
    }

    /// SIGKILL, as a crashed machine would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }

    /// Starts the member again on its data directory and ports (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.running())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn member(root: &Path, name: &str, tls: Option<EtcdTls>) -> EtcdMember {
    EtcdMember {
        name: name.to_string(),
        client_port: free_port(),
        peer_port: free_port(),
        data_dir: root.join(format!("{name}.etcd")),
        log: root.join(format!("{name}.log")),
        initial_cluster: String::new(),
        token: String::new(),
        tls,
        process: None,
    }
}

/// The token keeps members of two tests' clusters from ever joining each other.
fn token(root: &Path) -> String {
    format!("blockrep-test-{}", root.display()).replace('/', "-")
}

/// A single-member etcd, killed (with its data) when dropped.
pub struct EtcdServer {
    pub member: EtcdMember,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        EtcdServer::start_with(None)
    }

    /// A server that speaks only TLS on its client port.
    pub fn start_tls(tls: EtcdTls) -> EtcdServer {
        EtcdServer::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> EtcdServer {
        require(ETCD);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = member(dir.path(), "e0", tls);
        m.initial_cluster = format!("e0=http://127.0.0.1:{}", m.peer_port);
        m.token = token(dir.path());
        m.spawn();
        m.wait_healthy();
        EtcdServer {
            member: m,
            _dir: dir,
        }
    }

    pub fn endpoint(&self) -> String {
        self.member.endpoint()
    }

    pub fn port(&self) -> u16 {
        self.member.client_port
    }
}

/// An etcd cluster of `n` members on loopback, killed when dropped.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    pub fn start(n: usize) -> EtcdCluster {
        require(ETCD);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut members: Vec<EtcdMember> = (0..n)
            .map(|i| member(dir.path(), &format!("e{i}"), None))
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = token(dir.path());
        // All start before any is awaited: a member is healthy only once a quorum is up.
        for m in &mut members {
            m.initial_cluster = initial.clone();
            m.token = token.clone();
            m.spawn();
        }
        for m in &mut members {
            m.wait_healthy();
        }
        EtcdCluster { members, _dir: dir }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint()).collect()
    }

    /// The endpoints as one `--etcd-endpoints` value.
    pub fn endpoints_flag(&self) -> String {
        self.endpoints().join(",")
    }

    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Restarts member `i` and waits until it is healthy (back in the cluster).
    pub fn restart(&mut self, i: usize) {
        self.members[i].restart();
        self.members[i].wait_healthy();
    }
}

/// One HTTP/1.0 GET on loopback; the body, or what went wrong.
fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| format!("timeout: {e}"))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    Ok(reply
        .split_once("\r\n\r\n")
        .map_or(reply.clone(), |(_, body)| body.to_string()))
}
