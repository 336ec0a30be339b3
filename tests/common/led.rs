//! An etcd-led volume on loopback: a real etcd and `blockrep node` processes, each reaching
//! etcd through a relay of its own (so a test can cut one node from etcd alone), and the
//! failover writer (tests/clients/failover_writer.py) that follows whichever node serves.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::admin::http_get;
use super::etcd::EtcdCluster;
use super::process::{blockrep, run, timed, KillOnDrop};
use super::relay::Relay;
use super::wait::{poll_until, wait_until};
use super::{free_port, text, SYSTEM_PYTHON};

pub const WRITER_PY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/clients/failover_writer.py"
);

/// The lease TTL the tests run with, in seconds.
pub const TTL: u64 = 3;

/// How many FLUSHes the writer gets acknowledged before a fault, and after it.
pub const FLUSHES: usize = 20;

/// One volume at a time in a test process: each is an etcd and three nodes on a 3 s lease,
/// and on a small shared machine several at once starve each other's keep-alives (a leader
/// that misses its renewals loses its lease, which is right, but not what the tests are
/// about).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This test's turn to run a volume (see `ONE_AT_A_TIME`).
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A volume of three nodes running, its writer past its first `FLUSHES` on the leader, and
/// the turn that keeps other volumes of this test process waiting.
pub struct LedSetup {
    pub volume: LedVolume,
    pub writer: Writer,
    pub dir: tempfile::TempDir,
    pub turn: std::sync::MutexGuard<'static, ()>,
}

impl LedSetup {
    /// Takes the turn, starts three nodes in `shape` (each with `extra` flags) and the
    /// writer, and waits for its first `FLUSHES` on the leader.
    pub fn start(name: &str, shape: LedShape, extra: &[&str]) -> LedSetup {
        let turn = one_at_a_time();
        super::require_python_nbd();
        let dir = tempfile::Builder::new()
            .prefix(name)
            .tempdir()
            .expect("tempdir");
        let volume = LedVolume::start_shaped(dir.path(), 3, shape, extra);
        let mut writer = Writer::start(dir.path(), &volume.uris());
        let leader = volume.wait_for_leader(Duration::from_secs(30));
        let uri = volume.nodes[leader].uri();
        writer.wait_flushes(&uri, 0.0, FLUSHES, Duration::from_secs(60));
        LedSetup {
            volume,
            writer,
            dir,
            turn,
        }
    }
}

/// What a volume runs on: how many etcd members, its size, the nodes' lease TTL.
#[derive(Debug, Clone, Copy)]
pub struct LedShape<'a> {
    pub etcd_members: usize,
    /// `--size` (its syntax) for the stores the nodes create.
    pub size: &'a str,
    /// `--etcd-ttl`, in seconds.
    pub ttl: u64,
}

impl Default for LedShape<'_> {
    fn default() -> Self {
        LedShape {
            etcd_members: 1,
            size: "64MiB",
            ttl: TTL,
        }
    }
}

/// One `blockrep node` process and its ports.
pub struct LedNode {
    pub name: String,
    pub dir: PathBuf,
    pub nbd: u16,
    pub listen: u16,
    pub metrics: u16,
    /// `--size` for a store it creates.
    pub size: String,
    /// `--etcd-ttl`, in seconds.
    pub ttl: u64,
    /// Its way to etcd, with one etcd member: a relay the test can cut.
    pub relay: Relay,
    /// `--etcd-endpoints`: the relay, or with several etcd members all of them.
    pub endpoints: String,
    log: PathBuf,
    pub process: Option<KillOnDrop>,
}

impl LedNode {
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.nbd)
    }

    pub fn start(&mut self, volume: &str, extra: &[&str]) {
        let mut cmd = blockrep();
        cmd.env("BLOCKREP_LOG", "info")
            .arg("node")
            .arg(&self.dir)
            .args([
                "--size", &self.size, "--volume", volume, "--name", &self.name,
            ])
            .args(["--etcd-endpoints", &self.endpoints])
            .args(["--etcd-ttl", &self.ttl.to_string()])
            .args(["--nbd", &format!("127.0.0.1:{}", self.nbd)])
            .args(["--listen", &format!("127.0.0.1:{}", self.listen)])
            .args(["--metrics", &format!("127.0.0.1:{}", self.metrics)])
            .args(extra);
        let what = format!("blockrep node {}", self.name);
        self.process = Some(KillOnDrop::spawn(&mut cmd, &what, self.log.clone()));
    }

    /// Whether its admin endpoint says it leads (`GET /v1/primary` is 200).
    pub fn leads(&self) -> bool {
        let url = format!("http://127.0.0.1:{}/v1/primary", self.metrics);
        matches!(http_get(&url), Ok((200, _)))
    }

    /// Whether anything accepts a connection on its NBD port.
    pub fn nbd_open(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.nbd)).is_ok()
    }

    pub fn process(&mut self) -> &mut KillOnDrop {
        self.process.as_mut().expect("the node was started")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A volume of `n` nodes on one etcd.
pub struct LedVolume {
    pub etcd: EtcdCluster,
    pub volume: String,
    pub nodes: Vec<LedNode>,
    pub dir: PathBuf,
}

impl LedVolume {
    /// Starts etcd and `n` nodes of a 64 MiB volume (the first alone until it leads, so its
    /// store becomes the volume), and waits until every node is in the in-sync set.
    pub fn start(dir: &Path, n: usize, extra: &[&str]) -> LedVolume {
        LedVolume::start_shaped(dir, n, LedShape::default(), extra)
    }

    /// As `start`, for a volume of `size` (`--size`'s syntax).
    pub fn start_sized(dir: &Path, n: usize, size: &str, extra: &[&str]) -> LedVolume {
        let shape = LedShape {
            size,
            ..LedShape::default()
        };
        LedVolume::start_shaped(dir, n, shape, extra)
    }

    /// As `start`, in `shape`: with one etcd member each node reaches it through its own
    /// relay (which a test can cut), with several each node is given every member.
    pub fn start_shaped(dir: &Path, n: usize, shape: LedShape, extra: &[&str]) -> LedVolume {
        let etcd = EtcdCluster::start(shape.etcd_members);
        let mut v = LedVolume {
            volume: "vol".into(),
            nodes: Vec::new(),
            dir: dir.to_path_buf(),
            etcd,
        };
        for _ in 0..n {
            v.new_node(shape);
        }
        let volume = v.volume.clone();
        v.nodes[0].start(&volume, extra);
        v.wait_for_leader(Duration::from_secs(60));
        for node in &mut v.nodes[1..] {
            node.start(&volume, extra);
        }
        v.wait_in_sync(n);
        v
    }

    /// Adds node `n{len+1}` of `shape` (ports picked, not started) and returns its index.
    pub fn new_node(&mut self, shape: LedShape) -> usize {
        let name = format!("n{}", self.nodes.len() + 1);
        let relay = Relay::to_port(self.etcd.members[0].client_port);
        let endpoints = match self.etcd.members.len() {
            1 => relay.url("http"),
            _ => self.etcd.endpoints_flag(),
        };
        self.nodes.push(LedNode {
            dir: self.dir.join(&name),
            log: self.dir.join(format!("{name}.log")),
            nbd: free_port(),
            listen: free_port(),
            metrics: free_port(),
            size: shape.size.to_string(),
            ttl: shape.ttl,
            relay,
            endpoints,
            process: None,
            name,
        });
        self.nodes.len() - 1
    }

    /// `blockrep ctl list --json`.
    pub fn list(&self) -> Value {
        let out = run(timed(30, env!("CARGO_BIN_EXE_blockrep")).args([
            "ctl",
            "--etcd-endpoints",
            &self.etcd.endpoints_flag(),
            "--volume",
            &self.volume,
            "list",
            "--json",
        ]));
        assert!(out.status.success(), "ctl list: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("ctl list --json")
    }

    /// Waits until `n` members are in the in-sync set and one of them leads; on a timeout
    /// the failure says what etcd held last and what every node logged.
    pub fn wait_in_sync(&self, n: usize) {
        let within = Duration::from_secs(90);
        let mut last = Value::Null;
        let reached = poll_until(within, || {
            last = self.list();
            let in_sync = last["insync"]["members"].as_array().map_or(0, Vec::len);
            (in_sync == n && !last["leader"].is_null()).then_some(())
        });
        if reached.is_none() {
            panic!(
                "{n} nodes in sync: not reached within {within:?}; last seen: {last}\n{}",
                self.logs()
            );
        }
    }

    /// The index of the node whose admin endpoint says it leads, once one does.
    pub fn wait_for_leader(&self, within: Duration) -> usize {
        wait_until(within, "a node leads", || {
            self.nodes
                .iter()
                .position(|n| n.process.is_some() && n.leads())
        })
    }

    /// Waits until a node other than `old` leads.
    pub fn wait_for_new_leader(&self, old: usize, within: Duration) -> usize {
        wait_until(within, "another node leads", || {
            self.nodes
                .iter()
                .enumerate()
                .position(|(i, n)| i != old && n.process.is_some() && n.leads())
        })
    }

    pub fn uris(&self) -> Vec<String> {
        self.nodes.iter().map(LedNode::uri).collect()
    }

    /// Every node's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The failover writer, writing to whichever of `uris` serves.
pub struct Writer {
    pub log: PathBuf,
    process: KillOnDrop,
}

/// One line of the writer's log.
#[derive(Debug, Clone, PartialEq)]
pub enum Logged {
    Connected { at: f64, uri: String },
    Write { seq: u64, at: f64, uri: String },
    Flush { seq: u64, at: f64, uri: String },
    Error { at: f64, uri: String },
}

impl Writer {
    pub fn start(dir: &Path, uris: &[String]) -> Writer {
        let log = dir.join("writer.log");
        let mut cmd = Command::new(SYSTEM_PYTHON);
        cmd.arg(WRITER_PY).arg("write").arg(&log).args(uris);
        let process = KillOnDrop::spawn(&mut cmd, "the failover writer", dir.join("writer.stderr"));
        Writer { log, process }
    }

    pub fn lines(&self) -> Vec<Logged> {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        t.lines().filter_map(parse).collect()
    }

    /// The acknowledged FLUSHes by `uri` logged after `after` (wall clock, seconds).
    pub fn flushes_by(&self, uri: &str, after: f64) -> usize {
        self.lines()
            .iter()
            .filter(|l| matches!(l, Logged::Flush { at, uri: u, .. } if u == uri && *at > after))
            .count()
    }

    /// The time of the first acknowledged FLUSH by `uri` after `after`.
    pub fn first_flush_by(&self, uri: &str, after: f64) -> Option<f64> {
        self.lines().iter().find_map(|l| match l {
            Logged::Flush { at, uri: u, .. } if u == uri && *at > after => Some(*at),
            _ => None,
        })
    }

    /// The time of the first acknowledgement (a write or a FLUSH) by `uri` after `after`.
    pub fn first_ack_by(&self, uri: &str, after: f64) -> Option<f64> {
        self.acks_by_after(uri, after).iter().find_map(|l| match l {
            Logged::Write { at, .. } | Logged::Flush { at, .. } => Some(*at),
            _ => None,
        })
    }

    /// Acknowledgements (writes and FLUSHes) by `uri` logged after `after`.
    pub fn acks_by_after(&self, uri: &str, after: f64) -> Vec<Logged> {
        self.lines()
            .into_iter()
            .filter(|l| match l {
                Logged::Write { at, uri: u, .. } | Logged::Flush { at, uri: u, .. } => {
                    u == uri && *at > after
                }
                _ => false,
            })
            .collect()
    }

    /// The last acknowledgement by `uri`.
    pub fn last_ack_by(&self, uri: &str) -> Option<f64> {
        self.lines().iter().rev().find_map(|l| match l {
            Logged::Write { at, uri: u, .. } | Logged::Flush { at, uri: u, .. } if u == uri => {
                Some(*at)
            }
            _ => None,
        })
    }

    /// Waits until `uri` has acknowledged `n` FLUSHes after `after`.
    pub fn wait_flushes(&mut self, uri: &str, after: f64, n: usize, within: Duration) {
        wait_until(
            within,
            format_args!("{n} FLUSHes acknowledged by {uri}"),
            || {
                assert!(
                    self.process.running(),
                    "the writer died: {}",
                    self.process.stderr_text()
                );
                let seen = self.flushes_by(uri, after);
                (seen >= n).then_some(()).ok_or(format!("{seen} so far"))
            },
        );
    }

    /// Stops the writer and checks every acknowledged FLUSH against the image of the node
    /// that leads now (which is `expected` unless leadership moved again since; said if so).
    pub fn stop_and_verify(mut self, v: &LedVolume, expected: &str) {
        self.process.kill9();
        let leader = v.wait_for_leader(Duration::from_secs(60));
        let uri = v.nodes[leader].uri();
        if uri != expected {
            eprintln!("leadership moved on to {uri} (from {expected}) before the verification");
        }
        let out = run(timed(120, SYSTEM_PYTHON)
            .arg(WRITER_PY)
            .arg("verify")
            .arg(&self.log)
            .arg(&uri));
        assert!(
            out.status.success(),
            "acknowledged FLUSHes lost on {uri}: {}{}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            v.logs()
        );
    }
}

fn parse(line: &str) -> Option<Logged> {
    let p: Vec<&str> = line.split_whitespace().collect();
    let f = |i: usize| p.get(i).and_then(|s| s.parse::<f64>().ok());
    let u = |i: usize| p.get(i).map(|s| s.to_string());
    let n = |i: usize| p.get(i).and_then(|s| s.parse::<u64>().ok());
    match *p.first()? {
        "C" => Some(Logged::Connected {
            at: f(1)?,
            uri: u(2)?,
        }),
        "W" => Some(Logged::Write {
            seq: n(1)?,
            at: f(3)?,
            uri: u(4)?,
        }),
        "F" => Some(Logged::Flush {
            seq: n(1)?,
            at: f(2)?,
            uri: u(3)?,
        }),
        "E" => Some(Logged::Error {
            at: f(2)?,
            uri: u(3)?,
        }),
        _ => None,
    }
}

/// Now on the wall clock, in seconds (the writer logs the same clock).
pub fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
