//! `Node`: one `blockrep serve`, `replica` or `up` process with its ports, admin endpoint
//! and log, restartable with the same arguments. What differs between the tests (which
//! binary, how readiness shows, where the log goes) is a `NodeBuilder` option.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::process::{die_with_test, signal_pid};
use super::wait::{poll_until, wait_until};
use super::{free_port, strip_ansi, tail};

/// How a node shows that it is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// Its first stdout line contains this.
    Line(&'static str),
    /// Its first stdout line contains this, and the address of its admin endpoint shows on
    /// stdout (`metrics on http://` in that line, or a later `metrics and status: http://`).
    LineAndAdmin(&'static str),
    /// `GET /readyz` on this metrics port answers 200 and the node's port accepts; its
    /// stdout goes to the log with its stderr.
    Readyz(u16),
    /// Nothing to wait for here (the caller waits for what shows readiness); stdout goes to
    /// the log with stderr.
    Started,
}

/// How to start a `Node`; `Node::builder` gives the defaults.
pub struct NodeBuilder {
    name: String,
    bin: PathBuf,
    store: PathBuf,
    port: u16,
    args: Vec<OsString>,
    log: PathBuf,
    ready: Ready,
    env: Vec<(String, String)>,
    env_remove: Vec<String>,
    no_color: bool,
    stop_secs: u64,
    start_secs: u64,
    wait_port: bool,
}

impl NodeBuilder {
    /// Leaves `key` out of the node's environment.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env_remove.push(key.to_string());
        self
    }

    /// Another binary than this package's `blockrep` (a build with other features).
    pub fn bin(mut self, bin: &Path) -> Self {
        self.bin = bin.to_path_buf();
        self
    }

    /// Where the log goes (default: next to the store, `STORE.NAME.log`).
    pub fn log(mut self, log: PathBuf) -> Self {
        self.log = log;
        self
    }

    pub fn ready(mut self, ready: Ready) -> Self {
        self.ready = ready;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Leaves colour to the node (by default it runs with NO_COLOR).
    pub fn color(mut self) -> Self {
        self.no_color = false;
        self
    }

    /// How long `stop` gives the node to exit after SIGTERM (default 60 s).
    pub fn stop_timeout(mut self, secs: u64) -> Self {
        self.stop_secs = secs;
        self
    }

    /// How long the node has to get ready (default 60 s).
    pub fn start_timeout(mut self, secs: u64) -> Self {
        self.start_secs = secs;
        self
    }

    /// After the ready line, also wait until the node's port accepts connections.
    pub fn wait_for_port(mut self) -> Self {
        self.wait_port = true;
        self
    }

    /// Starts the node; on failure says why (with the tail of its log).
    pub fn try_start(self) -> Result<Node, String> {
        let mut n = Node {
            name: self.name,
            bin: self.bin,
            store: self.store,
            port: self.port,
            args: self.args,
            log_path: self.log,
            ready: self.ready,
            env: self.env,
            env_remove: self.env_remove,
            no_color: self.no_color,
            stop_secs: self.stop_secs,
            start_secs: self.start_secs,
            wait_port: self.wait_port,
            child: None,
            banner: String::new(),
            admin: String::new(),
        };
        n.try_restart()?;
        Ok(n)
    }

    pub fn start(self) -> Node {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A `blockrep` process (serve, replica, up), restartable with the same arguments and port.
/// Its log (stderr) is appended to one file across restarts. Drop kills it (SIGCONT first,
/// in case a test stopped it), and it dies with the test thread that started it.
pub struct Node {
    pub name: String,
    bin: PathBuf,
    pub store: PathBuf,
    /// Replication port of a replica, NBD port of a primary.
    pub port: u16,
    pub args: Vec<OsString>,
    pub log_path: PathBuf,
    ready: Ready,
    env: Vec<(String, String)>,
    env_remove: Vec<String>,
    no_color: bool,
    stop_secs: u64,
    start_secs: u64,
    wait_port: bool,
    pub child: Option<Child>,
    /// The first stdout line of the latest start.
    pub banner: String,
    /// host:port of the admin endpoint of the latest start (`Ready::LineAndAdmin`).
    pub admin: String,
}

impl Node {
    /// A node named `name` on `port`, running `blockrep ARGS`, ready once its first stdout
    /// line says `serving`, logging to `STORE.NAME.log`.
    pub fn builder(name: &str, store: &Path, port: u16, args: Vec<OsString>) -> NodeBuilder {
        NodeBuilder {
            name: name.to_string(),
            bin: PathBuf::from(env!("CARGO_BIN_EXE_blockrep")),
            store: store.to_path_buf(),
            port,
            args,
            log: store.with_extension(format!("{name}.log")),
            ready: Ready::Line("serving"),
            env: Vec::new(),
            env_remove: Vec::new(),
            no_color: true,
            stop_secs: 60,
            start_secs: 60,
            wait_port: false,
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args).stdin(Stdio::null());
        if self.no_color {
            cmd.env("NO_COLOR", "1");
        }
        // Removals first: a variable set for this node wins over one left out of the rest.
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        match self.ready {
            Ready::Readyz(_) | Ready::Started => cmd.stdout(log.try_clone().expect("log file")),
            Ready::Line(_) | Ready::LineAndAdmin(_) => cmd.stdout(Stdio::piped()),
        };
        cmd.stderr(log);
        die_with_test(&mut cmd);
        cmd
    }

    /// Starts the (stopped) node again with the same arguments; on failure says why.
    pub fn try_restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut child = self
            .command()
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({:?}): {e}", self.name, self.bin));
        let outcome = match self.ready {
            Ready::Readyz(metrics) => self.await_readyz(&mut child, metrics),
            Ready::Line(_) | Ready::LineAndAdmin(_) => self.await_stdout(&mut child),
            Ready::Started => Ok(()),
        };
        match outcome {
            Ok(()) => {
                self.child = Some(child);
                if self.wait_port {
                    let port = self.port;
                    wait_until(
                        Duration::from_secs(30),
                        format!("{}: nothing listens on port {port}", self.name),
                        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
                    );
                }
                Ok(())
            }
            Err(failure) => {
                let _ = child.kill();
                let status = child.wait();
                Err(format!(
                    "{} did not start ({failure}; status {status:?}); log:\n{}",
                    self.name,
                    tail(&self.log(), 60)
                ))
            }
        }
    }

    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Reads stdout for the ready line (and the admin address if asked for).
    fn await_stdout(&mut self, child: &mut Child) -> Result<(), String> {
        let rx = stdout_lines(child);
        let (needle, want_admin) = match self.ready {
            Ready::Line(n) => (n, false),
            Ready::LineAndAdmin(n) => (n, true),
            Ready::Readyz(_) | Ready::Started => unreachable!("no stdout to read"),
        };
        let deadline = Instant::now() + Duration::from_secs(self.start_secs);
        let first = next_line(&rx, deadline)?;
        if !first.contains(needle) {
            return Err(format!("first stdout line {first:?}"));
        }
        self.banner = first;
        if !want_admin {
            return Ok(());
        }
        if let Some(rest) = self.banner.split("metrics on http://").nth(1) {
            self.admin = rest.trim().trim_end_matches('/').to_string();
            if self.admin.is_empty() {
                return Err(format!("no metrics address in {:?}", self.banner));
            }
            return Ok(());
        }
        loop {
            let line = next_line(&rx, deadline)?;
            if let Some(rest) = line.split("metrics and status: http://").nth(1) {
                self.admin = rest.split('/').next().unwrap_or("").trim().to_string();
                return Ok(());
            }
        }
    }

    fn await_readyz(&self, child: &mut Child, metrics: u16) -> Result<(), String> {
        let port = self.port;
        let ready = poll_until(Duration::from_secs(self.start_secs), || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(format!("it exited with {st} while starting")));
            }
            (readyz(metrics) && TcpStream::connect(("127.0.0.1", port)).is_ok()).then_some(Ok(()))
        });
        ready.unwrap_or_else(|| Err(format!("not ready within {}s", self.start_secs)))
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The metrics (admin) port of a node started with `Ready::Readyz`.
    pub fn metrics_port(&self) -> u16 {
        match self.ready {
            Ready::Readyz(port) => port,
            _ => panic!("{} was not started with a known metrics port", self.name),
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/", self.port)
    }

    /// The URI of export `name` on this node.
    pub fn export_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .id()
    }

    /// The exit status if the process has exited (it is reaped then, but stays here).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    pub fn running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// The log so far, colour sequences removed.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    /// Where the log ends now; `wait_log` and `log_since` look only past a mark.
    pub fn mark(&self) -> usize {
        self.log().len()
    }

    pub fn log_since(&self, from: usize) -> String {
        self.log().get(from..).unwrap_or("").to_string()
    }

    /// Lines past `from` that contain every one of `needles`.
    pub fn lines_with(&self, from: usize, needles: &[&str]) -> Vec<String> {
        self.log_since(from)
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// The last 60 lines of the log past `from`, read only when displayed (for the messages
    /// of waits that fail).
    pub fn log_tail(&self, from: usize) -> impl std::fmt::Display + '_ {
        LogTail(self, from)
    }

    /// Waits for a log line past `from` that contains every one of `needles`; returns it.
    pub fn wait_log(&self, from: usize, needles: &[&str], secs: u64) -> String {
        wait_until(
            Duration::from_secs(secs),
            format_args!(
                "{}: no log line with {needles:?}; log since the mark:\n{}",
                self.name,
                self.log_tail(from)
            ),
            || self.lines_with(from, needles).into_iter().next(),
        )
    }

    /// SIGTERM, then the exit status (SIGKILL and a panic if it takes too long).
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        signal_pid(child.id() as i32, libc::SIGTERM);
        let secs = self.stop_secs;
        match poll_until(Duration::from_secs(secs), || {
            child.try_wait().expect("wait")
        }) {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {secs}s of SIGTERM; log:\n{}",
                    self.name,
                    tail(&self.log(), 60)
                );
            }
        }
    }

    /// SIGTERM, and the process must exit 0.
    pub fn stop_ok(&mut self) {
        let st = self.stop();
        assert!(
            st.success(),
            "{}: exit status {st} after SIGTERM; log:\n{}",
            self.name,
            tail(&self.log(), 60)
        );
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop()
    }

    pub fn signal(&self, sig: i32) {
        signal_pid(self.pid() as i32, sig);
    }

    /// SIGKILL: no chance to flush or close anything. A stopped process is killed all the
    /// same; SIGCONT first for tidiness.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                signal_pid(c.id() as i32, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A replica listens on `port` from its next start on.
    pub fn set_listen_port(&mut self, port: u16) {
        let i = self
            .args
            .iter()
            .position(|a| a == "--listen")
            .expect("--listen");
        self.args[i + 1] = format!("127.0.0.1:{port}").into();
        self.port = port;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The tail of a node's log past a mark, rendered only when a wait fails.
struct LogTail<'a>(&'a Node, usize);

impl std::fmt::Display for LogTail<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&tail(&self.0.log_since(self.1), 60))
    }
}

/// Every stdout line of `child`, through a channel; the reader keeps draining after the
/// receiver is gone, so the child never blocks on a full pipe.
fn stdout_lines(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut receiver_alive = true;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if receiver_alive && tx.send(line).is_err() {
                receiver_alive = false;
            }
        }
    });
    rx
}

fn next_line(rx: &Receiver<String>, deadline: Instant) -> Result<String, String> {
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(line) => Ok(line),
        Err(RecvTimeoutError::Timeout) => Err("no ready line in time".to_string()),
        Err(RecvTimeoutError::Disconnected) => Err("it exited".to_string()),
    }
}

/// Whether `GET /readyz` on the admin endpoint at `port` answers 200.
fn readyz(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// `serve STORE --nbd 127.0.0.1:PORT [extra...]`.
pub fn serve_args(store: &Path, port: u16, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "serve".into(),
        store.into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

/// A `blockrep serve` process: a `Node` with the name `serve`.
pub type Served = Node;

/// Starts `blockrep serve STORE --nbd 127.0.0.1:PORT [extra...]` and waits until it
/// accepts connections.
pub fn serve(store: &Path, extra: &[&str]) -> Served {
    let port = free_port();
    let args = serve_args(store, port, extra);
    Node::builder("blockrep serve", store, port, args)
        .log(store.with_extension(format!("serve-{port}.log")))
        .color()
        .wait_for_port()
        .start()
}
