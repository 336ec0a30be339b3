//! The operations side, end to end: real `blockrep` processes on loopback scraped by a real
//! Prometheus (Debian's `prometheus` package) that loads `metrics/prometheus/alerts.yml`;
//! every expression of the Grafana dashboard (`metrics/grafana/blockrep.json`) and every
//! alert evaluated against them; the alerts firing when a replica stops; exact metric values
//! after a known number of requests; `promtool` on the rules (syntax and unit tests);
//! `systemd-analyze verify` on the units in `systemd/`; the sd_notify protocol (READY=1,
//! STOPPING=1, WATCHDOG=1) as the units use it; and `--config FILE`.
//!
//! Every tool is required, never skipped (`scripts/test` installs them). Every child process
//! is killed when its guard drops and also (PR_SET_PDEATHSIG) when the test thread that
//! started it ends; every wait has a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_blockrep");
const VOLUME: &str = "vol1";
/// Short barrier timeout, so a FLUSH that cannot be met fails fast.
const BARRIER_MS: &str = "1500";

fn repo(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------- tools

fn require_tools(tools: &[&str]) {
    for t in tools {
        require(t);
    }
}

fn require_python_nbd() {
    require(SYSTEM_PYTHON);
    let out = run(Command::new("timeout")
        .args(["30", SYSTEM_PYTHON, "-c", "import nbd"])
        .stdin(Stdio::null()));
    assert!(
        out.status.success(),
        "{SYSTEM_PYTHON} lacks the libnbd binding (python3-libnbd): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until `f` returns Some, at most `secs`; panics with `what` (and the last state
/// `f` reported through `last`) otherwise.
fn wait_until<T>(secs: u64, what: &str, mut f: impl FnMut(&mut String) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    loop {
        if let Some(v) = f(&mut last) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}; last seen: {last}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------- processes

/// A child process whose stdout and stderr go to a log file; killed on drop.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_test(cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (SIGKILL and a panic after `secs`).
    fn terminate(&mut self, secs: u64) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {secs}s of SIGTERM; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate_ok(&mut self) {
        let st = self.terminate(60);
        assert!(
            st.success(),
            "{}: exit status {st} after SIGTERM; log:\n{}",
            self.name,
            self.log_text()
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped process is killed all the same; SIGCONT first for tidiness.
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------- HTTP

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// GET: (status, body), or Err when nothing answers.
fn http_get(url: &str) -> Result<(u16, String), String> {
    let mut resp = agent()
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: body: {e}"))?;
    Ok((status, body))
}

fn get_ok(url: &str) -> String {
    match http_get(url) {
        Ok((200, body)) => body,
        other => panic!("GET {url}: {other:?}"),
    }
}

// ---------------------------------------------------------------------------- /metrics

/// One sample of the text exposition: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or(f64::NAN),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                // Label values here never contain `",` (volume and replica names are plain).
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label");
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Family names declared in an exposition (`# TYPE name kind`), with their kind.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (n, k) = l.split_once(' ')?;
            Some((n.to_string(), k.to_string()))
        })
        .collect()
}

struct Scrape(Vec<Sample>);

impl Scrape {
    fn of(metrics_port: u16) -> Scrape {
        Scrape(parse_exposition(&get_ok(&format!(
            "http://127.0.0.1:{metrics_port}/metrics"
        ))))
    }

    /// The value of the one series `name` with (at least) `labels`; panics if none.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name}{labels:?} in /metrics; it has:\n{}",
                self.0
                    .iter()
                    .filter(|s| s.name == name)
                    .map(|s| format!("  {s:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let hits: Vec<&Sample> = self
            .0
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(hits.len() <= 1, "{name}{labels:?} is ambiguous: {hits:?}");
        hits.first().map(|s| s.value)
    }
}

// ---------------------------------------------------------------------------- nodes

/// A `blockrep serve` or `blockrep replica` process, restartable with the same arguments.
struct Node {
    name: String,
    store: PathBuf,
    /// NBD port of a primary, replication port of a replica.
    port: u16,
    metrics: u16,
    args: Vec<String>,
    proc: Proc,
}

impl Node {
    fn launch(name: &str, store: &Path, port: u16, metrics: u16, args: Vec<String>) -> Node {
        let log = store.with_extension(format!("{name}.log"));
        let proc = Proc::spawn(name, &mut blockrep_cmd(&args), &log);
        let mut n = Node {
            name: name.to_string(),
            store: store.to_path_buf(),
            port,
            metrics,
            args,
            proc,
        };
        n.wait_ready();
        n
    }

    fn wait_ready(&mut self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok((200, _)) = http_get(&url) {
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return;
                }
            }
            assert!(
                self.proc.running(),
                "{} exited while starting; log:\n{}",
                self.name,
                self.proc.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "{} not ready within 90s; log:\n{}",
                self.name,
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn restart(&mut self) {
        assert!(!self.proc.running(), "{} is still running", self.name);
        let log = self.proc.log.clone();
        self.proc = Proc::spawn(&self.name, &mut blockrep_cmd(&self.args), &log);
        self.wait_ready();
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/blockrep", self.port)
    }

    fn metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics)
    }

    fn scrape(&self) -> Scrape {
        Scrape::of(self.metrics)
    }

    fn status(&self) -> Value {
        serde_json::from_str(&get_ok(&format!(
            "http://127.0.0.1:{}/v1/status",
            self.metrics
        )))
        .expect("status JSON")
    }

    /// The state of replica `name` in this primary's status report.
    fn replica_state(&self, name: &str) -> String {
        self.status()["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["state"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    fn wait_replica_state(&self, name: &str, state: &str, secs: u64) {
        wait_until(
            secs,
            &format!("{} to see replica {name} {state}", self.name),
            |last| {
                let s = self.replica_state(name);
                let done = s == state;
                *last = s;
                done.then_some(())
            },
        );
    }
}

fn blockrep_cmd(args: &[String]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env("BLOCKREP_LOG", "info");
    cmd
}

fn create_store_sized(parent: &Path, name: &str, size: &str) -> PathBuf {
    let dir = parent.join(name);
    run_ok(
        Command::new("timeout")
            .args(["60", BIN, "create"])
            .arg(&dir)
            .args(["--size", size, "--wal-size", "64MiB"]),
    );
    dir
}

fn start_replica(store: &Path, name: &str) -> Node {
    let (port, metrics) = (free_port(), free_port());
    let args = vec![
        "replica".to_string(),
        store.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--metrics".into(),
        format!("127.0.0.1:{metrics}"),
        "--volume-name".into(),
        VOLUME.into(),
    ];
    Node::launch(name, store, port, metrics, args)
}

fn start_primary(store: &Path, name: &str, replicas: &[&Node], extra: &[&str]) -> Node {
    start_primary_on(store, name, free_port(), replicas, extra)
}

fn start_primary_on(
    store: &Path,
    name: &str,
    metrics: u16,
    replicas: &[&Node],
    extra: &[&str],
) -> Node {
    let port = free_port();
    let mut args = vec![
        "serve".to_string(),
        store.display().to_string(),
        "--nbd".into(),
        format!("127.0.0.1:{port}"),
        "--metrics".into(),
        format!("127.0.0.1:{metrics}"),
        "--volume-name".into(),
        VOLUME.into(),
        "--barrier-timeout-ms".into(),
        BARRIER_MS.into(),
    ];
    for r in replicas {
        args.push("--replica".into());
        args.push(format!("{}={}", r.name, r.addr()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Node::launch(name, store, port, metrics, args)
}

// ---------------------------------------------------------------------------- NBD client

/// One libnbd connection driven by commands on its argument list (see `ops`): `w:OFF:LEN:N`
/// writes N blocks of LEN bytes from OFF, `f` (or `f:N`) flushes, `r:OFF:LEN:N` reads,
/// `pause` prints "paused" and waits for a line on stdin. Prints `ok CMD` or `err CMD ERRNO`.
const OPS_PY: &str = r#"
import errno, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for cmd in sys.argv[2:]:
    op, *a = cmd.split(":")
    try:
        if op == "w":
            off, ln, n = map(int, a)
            for i in range(n):
                h.pwrite(bytes([i % 250 + 1]) * ln, off + i * ln)
        elif op == "f":
            for _ in range(int(a[0]) if a else 1):
                h.flush()
        elif op == "r":
            off, ln, n = map(int, a)
            for i in range(n):
                h.pread(ln, off + i * ln)
        elif op == "pause":
            print("paused", flush=True)
            sys.stdin.readline()
        else:
            raise SystemExit("unknown command " + cmd)
        print("ok " + cmd, flush=True)
    except nbd.Error as e:
        print("err %s %s" % (cmd, errno.errorcode.get(e.errno, e.errno)), flush=True)
try:
    h.shutdown()
except nbd.Error:
    pass
print("closed", flush=True)
"#;

/// Runs the ops to completion; returns the lines it printed.
fn nbd_ops(uri: &str, ops: &[&str]) -> Vec<String> {
    let out = run(Command::new("timeout")
        .args(["-k", "5", "120", SYSTEM_PYTHON, "-c", OPS_PY, uri])
        .args(ops)
        .stdin(Stdio::null()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("closed"),
        "nbd client {ops:?} on {uri}: {}\nstdout:\n{text}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_string).collect()
}

fn assert_all_ok(lines: &[String], what: &str) {
    assert!(
        lines.iter().all(|l| !l.starts_with("err")),
        "{what}: {lines:?}"
    );
}

/// A client that stops at its `pause` command until `resume`.
struct PausedClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl PausedClient {
    fn start(uri: &str, ops: &[&str]) -> PausedClient {
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", "120", SYSTEM_PYTHON, "-c", OPS_PY, uri])
            .args(ops)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_test(&mut cmd);
        let mut child = cmd.spawn().expect("spawn python nbd client");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        PausedClient {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one equals `line`.
    fn wait_line(&mut self, line: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let done = l == line;
                    self.seen.push(l);
                    if done {
                        return;
                    }
                }
                Err(e) => panic!("client: no {line:?} ({e}); it said {:?}", self.seen),
            }
        }
    }

    fn resume_and_finish(&mut self) {
        let mut stdin = self.stdin.take().expect("stdin");
        writeln!(stdin).expect("resume the client");
        drop(stdin);
        self.wait_line("closed", 60);
        let st = self.child.wait().expect("wait");
        assert!(st.success(), "client: {st}; said {:?}", self.seen);
    }
}

impl Drop for PausedClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fio_with_flushes(uri: &str, secs: u32, dir: &Path) {
    let out = run(Command::new("timeout")
        .args(["-k", "5", "180", "fio"])
        .arg("--name=obs")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args([
            "--rw=randrw",
            "--rwmixread=30",
            "--bs=4k",
            "--size=8M",
            "--iodepth=8",
            "--fsync=16",
            "--time_based",
        ])
        .arg(format!("--runtime={secs}"))
        .arg(format!("--directory={}", dir.display()))
        .stdin(Stdio::null()));
    assert!(
        out.status.success(),
        "fio failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------- Prometheus

struct Prometheus {
    proc: Proc,
    port: u16,
}

impl Prometheus {
    /// A Prometheus on loopback scraping `targets` (job "blockrep") every second, with
    /// `rules` loaded.
    fn start(dir: &Path, targets: &[String], rules: &Path) -> Prometheus {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: blockrep\n    static_configs:\n      - targets: [{list}]\n",
                rules.display()
            ),
        )
        .unwrap();
        let out = run(Command::new("timeout")
            .args(["60", "promtool", "check", "config"])
            .arg(&config));
        assert!(
            out.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let proc = Proc::spawn(
            "prometheus",
            Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--storage.tsdb.retention.time=1h")
                .arg("--log.level=warn"),
            &dir.join("prometheus.log"),
        );
        let mut p = Prometheus { proc, port };
        let url = format!("http://127.0.0.1:{port}/-/ready");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(http_get(&url), Ok((200, _))) {
            assert!(
                p.proc.running() && Instant::now() < deadline,
                "prometheus did not become ready; log:\n{}",
                p.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn api(&self, path: &str) -> Value {
        let body = get_ok(&format!("http://127.0.0.1:{}/api/v1/{path}", self.port));
        let v: Value = serde_json::from_str(&body).expect("API JSON");
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }

    /// An instant query: Ok(result vector) or Err(the API's error).
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let mut resp = agent()
            .post(&url)
            .send_form([("query", expr)])
            .map_err(|e| format!("POST {url}: {e}"))?;
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        if v["data"]["resultType"] != "vector" {
            return Err(format!("not an instant vector: {}", v["data"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    fn query_ok(&self, expr: &str) -> Vec<Value> {
        self.query(expr)
            .unwrap_or_else(|e| panic!("query {expr}: {e}"))
    }

    /// Waits until `expr` returns at least one series.
    fn wait_nonempty(&self, expr: &str, secs: u64) -> Vec<Value> {
        wait_until(
            secs,
            &format!("Prometheus to return data for {expr}"),
            |last| {
                let r = self.query_ok(expr);
                *last = format!("{r:?}");
                (!r.is_empty()).then_some(r)
            },
        )
    }

    fn alerting_rules(&self) -> Vec<Value> {
        self.api("rules")["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["type"] == "alerting")
            .collect()
    }

    fn alerts(&self) -> Vec<Value> {
        self.api("alerts")["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The active alert `name` whose labels include `labels`, if any.
    fn alert(&self, name: &str, labels: &[(&str, &str)]) -> Option<Value> {
        self.alerts().into_iter().find(|a| {
            a["labels"]["alertname"] == name && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
        })
    }

    /// Waits until alert `name` is active (pending or firing) with `labels`, and in one of
    /// `states`.
    fn wait_alert(&self, name: &str, labels: &[(&str, &str)], states: &[&str], secs: u64) -> Value {
        wait_until(
            secs,
            &format!("alert {name}{labels:?} in {states:?}"),
            |last| {
                let a = self.alert(name, labels);
                *last = format!("{:?}", self.alerts());
                a.filter(|a| states.iter().any(|s| a["state"] == *s))
            },
        )
    }
}

fn value_of(series: &Value) -> f64 {
    match series["value"][1].as_str().unwrap_or("NaN") {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or(f64::NAN),
    }
}

/// The shipped rules with every `for:` shortened to 1s (the expressions are unchanged).
fn rules_with_short_for(dir: &Path) -> PathBuf {
    let text = read(&repo("metrics/prometheus/alerts.yml"));
    let mut changed = 0;
    let short: Vec<String> = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                changed += 1;
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}for: 1s")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(
        changed >= 4,
        "expected several `for:` clauses, found {changed}"
    );
    let path = dir.join("alerts-short-for.yml");
    std::fs::write(&path, short.join("\n") + "\n").unwrap();
    path
}

// ---------------------------------------------------------------------------- dashboard

fn dashboard() -> Value {
    serde_json::from_str(&read(&repo("metrics/grafana/blockrep.json")))
        .expect("metrics/grafana/blockrep.json is not valid JSON")
}

/// (panel title, expr) for every query target of every panel (rows included).
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((
                        p["title"].as_str().unwrap_or("?").to_string(),
                        e.to_string(),
                    ));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// The dashboard's variables as Grafana would substitute them for a query.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "15s")
        .replace("${volume}", VOLUME)
        .replace("$volume", VOLUME)
        .replace("${replica}", "r1|r2")
        .replace("$replica", "r1|r2")
}

/// Every `blockrep_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("blockrep_") {
        let start = i + pos;
        let word_start =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if word_start {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The family a sample name belongs to (histograms expose `_bucket`, `_sum`, `_count`).
fn family_of(name: &str, families: &BTreeMap<String, String>) -> Option<String> {
    if families.contains_key(name) {
        return Some(name.to_string());
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if families.get(base).map(String::as_str) == Some("histogram") {
                return Some(base.to_string());
            }
        }
    }
    None
}

// ============================================================================ tests

/// The full picture: 2 replicas and a primary, each with its own metrics port, scraped by a
/// real Prometheus that loads alerts.yml as shipped; fio writes with flushes; a replica
/// outage (FLUSH failures, then a catch-up); a rebuild that is stalled on purpose (the
/// rebuilding replica is SIGSTOPped); then a promotion that fences the old primary. Every
/// dashboard expression must return data, and every alert expression must return data at
/// one of those moments, except the ones listed (with the reason) in `MAY_BE_EMPTY`.
#[test]
fn prometheus_scrapes_a_replicated_volume_and_every_dashboard_and_alert_expression_returns_data() {
    require_tools(&["prometheus", "promtool", "fio", "timeout"]);
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Alerts whose expression may legitimately return an empty vector here: each must still
    // be valid and evaluate without error (checked), and its logic is unit-tested by
    // `alert_rules_fire_and_stay_quiet_as_specified` with promtool.
    const MAY_BE_EMPTY: [(&str, &str); 3] = [
        (
            "BlockrepRebuildStalled",
            "needs 15 minutes without rebuild progress (progress is reported every second while \
             a rebuild moves); the promtool unit test covers it",
        ),
        (
            "BlockrepReplicaLagging",
            "needs 30 s of replica lag; the replica-outage test waits for it and sees it fire",
        ),
        (
            "BlockrepWALNearFull",
            "a healthy node never holds 90% of its WAL: retention is capped at half the WAL \
             and checkpoints release the rest",
        ),
    ];

    // Volume 256 MiB: big enough that the rebuild below is still running when its replica
    // is stopped.
    let size = "256MiB";
    let p_store = create_store_sized(dir, "p", size);
    let r1_store = create_store_sized(dir, "r1", size);
    let r2_store = create_store_sized(dir, "r2", size);
    let mut r1 = start_replica(&r1_store, "r1");
    let mut r2 = start_replica(&r2_store, "r2");
    // The new primary after the promotion at the end: its metrics port is a target from
    // the start (down until then).
    let spare_metrics = free_port();
    let p = start_primary(&p_store, "p", &[&r1, &r2], &["--rebuild-rate", "1MiB"]);
    p.wait_replica_state("r1", "in_sync", 30);
    p.wait_replica_state("r2", "in_sync", 30);
    let targets = vec![
        p.metrics_addr(),
        r1.metrics_addr(),
        r2.metrics_addr(),
        format!("127.0.0.1:{spare_metrics}"),
    ];
    let prom = Prometheus::start(dir, &targets, &repo("metrics/prometheus/alerts.yml"));
    let rules = prom.alerting_rules();
    assert!(
        rules.len() >= 6,
        "alerts.yml loaded only {} rules",
        rules.len()
    );
    for (name, _) in MAY_BE_EMPTY {
        assert!(
            rules.iter().any(|r| r["name"] == name),
            "allow-listed alert {name} is not in alerts.yml"
        );
    }

    // Every node scraped once before the traffic, so every rate() below has a sample from
    // before it (on a loaded machine the first scrape can come late).
    prom.wait_nonempty(r#"count(up{job="blockrep"} == 1) >= 3"#, 60);

    // Traffic: reads, writes and flushes.
    fio_with_flushes(&p.uri(), 5, dir);

    // A replica outage: FLUSHes fail (sync-all), then it catches up.
    r2.proc.terminate_ok();
    let lines = nbd_ops(&p.uri(), &["w:0:4096:4", "f"]);
    assert!(
        lines.iter().any(|l| l.starts_with("err f EIO")),
        "a FLUSH with a replica down under sync-all must fail: {lines:?}"
    );
    r2.restart();
    p.wait_replica_state("r2", "in_sync", 30);

    // A rebuild: r2 comes back blank (a replaced disk), and is rebuilt at 1 MiB/s; then it
    // hangs (SIGSTOP) mid-rebuild, so the rebuild stalls.
    r2.proc.terminate_ok();
    std::fs::remove_dir_all(&r2.store).unwrap();
    r2.args.extend(["--size".to_string(), size.to_string()]);
    r2.restart();
    p.wait_replica_state("r2", "rebuilding", 30);
    r2.proc.signal(libc::SIGSTOP);
    prom.wait_nonempty(
        r#"blockrep_replica_state{replica="r2", state="rebuilding"} == 1"#,
        30,
    );
    prom.wait_nonempty(r#"up{job="blockrep"} == 0"#, 30);
    // Every series of the primary scraped at least twice since the outage ended.
    std::thread::sleep(Duration::from_secs(3));

    // Every dashboard expression.
    let d = dashboard();
    let exprs = dashboard_exprs(&d);
    assert!(exprs.len() >= 20, "only {} dashboard queries", exprs.len());
    let mut failures = Vec::new();
    for (title, expr) in &exprs {
        let q = substitute(expr);
        match prom.query(&q) {
            Err(e) => failures.push(format!("{title}: {q}\n    error: {e}")),
            Ok(r) if r.is_empty() => failures.push(format!("{title}: {q}\n    returned no series")),
            Ok(r) => {
                if !r.iter().any(|s| value_of(s).is_finite()) {
                    failures.push(format!("{title}: {q}\n    only NaN/Inf values: {r:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries that return nothing useful:\n{}",
        failures.join("\n")
    );
    // The state timeline shows the rebuild (code 7 = rebuilding) and r1 in sync (5).
    let (_, timeline) = exprs
        .iter()
        .find(|(t, _)| t == "Replica state")
        .expect("a Replica state panel");
    let codes: HashMap<String, f64> = prom
        .query_ok(&substitute(timeline))
        .iter()
        .map(|s| {
            (
                s["metric"]["replica"].as_str().unwrap_or("").to_string(),
                value_of(s),
            )
        })
        .collect();
    assert_eq!(
        codes.get("r1"),
        Some(&5.0),
        "state timeline codes: {codes:?}"
    );
    assert_eq!(
        codes.get("r2"),
        Some(&7.0),
        "state timeline codes: {codes:?}"
    );

    // Every alert expression, as Prometheus loaded it.
    let mut returned: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let check_alerts = |returned: &mut BTreeMap<String, Vec<Value>>| {
        for r in prom.alerting_rules() {
            let name = r["name"].as_str().unwrap().to_string();
            let expr = r["query"].as_str().unwrap();
            let series = prom
                .query(expr)
                .unwrap_or_else(|e| panic!("alert {name}: {expr}: {e}"));
            if !series.is_empty() {
                returned.insert(name, series);
            } else {
                returned.entry(name).or_default();
            }
        }
    };
    check_alerts(&mut returned);
    let not_in_sync = &returned["BlockrepReplicaNotInSync"];
    assert!(
        not_in_sync.iter().all(|s| s["metric"]["replica"] == "r2") && !not_in_sync.is_empty(),
        "only r2 is out of sync: {not_in_sync:?}"
    );

    // The rebuild resumes and finishes; then a promotion fences the old primary.
    r2.proc.signal(libc::SIGCONT);
    p.wait_replica_state("r2", "in_sync", 120);
    r1.proc.terminate_ok();
    let new_primary = start_primary_on(&r1.store, "r1p", spare_metrics, &[&r2], &[]);
    assert!(
        new_primary.status()["epoch"].as_u64() == Some(2),
        "the promoted primary serves at epoch 2: {}",
        new_primary.status()
    );
    // The old primary learns of the new epoch when it next talks to r2.
    let lines = nbd_ops(&p.uri(), &["w:0:4096:1", "f"]);
    assert!(
        lines.iter().any(|l| l.starts_with("err")),
        "the old primary must refuse after the promotion: {lines:?}"
    );
    wait_until(30, "the old primary to report itself fenced", |last| {
        let v = p.scrape().get("blockrep_fenced", &[("volume", VOLUME)]);
        *last = v.to_string();
        (v == 1.0).then_some(())
    });
    prom.wait_nonempty(
        &format!(r#"blockrep_fenced{{instance="{}"}} == 1"#, p.metrics_addr()),
        30,
    );
    prom.wait_nonempty(
        &format!(
            r#"blockrep_epoch{{instance="{}"}} == 2"#,
            new_primary.metrics_addr()
        ),
        30,
    );
    check_alerts(&mut returned);
    let fenced = &returned["BlockrepFenced"];
    assert!(
        fenced.len() == 1 && fenced[0]["metric"]["instance"] == p.metrics_addr().as_str(),
        "only the old primary is fenced: {fenced:?}"
    );

    // Every rule's evaluation is healthy, and every alert returned data at some point unless
    // allow-listed.
    for r in prom.alerting_rules() {
        assert_eq!(
            r["health"], "ok",
            "rule {} evaluates with an error: {r}",
            r["name"]
        );
    }
    let empty: Vec<&String> = returned
        .iter()
        .filter(|(name, series)| series.is_empty() && !MAY_BE_EMPTY.iter().any(|(n, _)| n == name))
        .map(|(name, _)| name)
        .collect();
    assert!(
        empty.is_empty(),
        "alert expressions that never returned data: {empty:?} (all: {returned:#?})"
    );
    drop(new_primary);
    drop(p);
}

/// Stopping a replica: Prometheus sees its lag grow (entries, bytes, then seconds) and the
/// not-in-sync, flush-failure, target-down and lag alerts go pending/firing (alerts.yml with
/// every `for:` shortened to 1s); restarting it brings the lag back to 0 and the alerts
/// resolve.
#[test]
fn stopping_a_replica_raises_its_lag_and_fires_the_replica_alerts_until_it_is_back() {
    require_tools(&["prometheus", "promtool", "timeout"]);
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r1 = start_replica(&create_store_sized(dir, "r1", "32MiB"), "r1");
    let mut r2 = start_replica(&create_store_sized(dir, "r2", "32MiB"), "r2");
    let p = start_primary(
        &create_store_sized(dir, "p", "32MiB"),
        "p",
        &[&r1, &r2],
        &[],
    );
    p.wait_replica_state("r2", "in_sync", 30);
    let rules = rules_with_short_for(dir);
    let prom = Prometheus::start(
        dir,
        &[p.metrics_addr(), r1.metrics_addr(), r2.metrics_addr()],
        &rules,
    );
    assert_all_ok(
        &nbd_ops(&p.uri(), &["w:0:4096:8", "f"]),
        "writes before the outage",
    );
    prom.wait_nonempty(
        r#"blockrep_replica_state{replica="r2", state="in_sync"} == 1 and on (instance, volume, replica) blockrep_replica_lag_lsn == 0"#,
        30,
    );
    assert!(
        prom.alerts().is_empty(),
        "no alert while everything is healthy: {:?}",
        prom.alerts()
    );

    r2.proc.terminate_ok();
    let lines = nbd_ops(&p.uri(), &["w:65536:4096:5", "f"]);
    assert!(
        lines.iter().any(|l| l == "err f EIO"),
        "FLUSH with r2 down (sync-all): {lines:?}"
    );
    let lag = |name: &str, replica: &str| -> f64 {
        let r = prom.query_ok(&format!(
            r#"blockrep_replica_{name}{{replica="{replica}"}}"#
        ));
        r.first().map(value_of).unwrap_or(f64::NAN)
    };
    wait_until(
        30,
        "r2's lag in entries and bytes to show in Prometheus",
        |last| {
            let (l, b) = (lag("lag_lsn", "r2"), lag("lag_bytes", "r2"));
            *last = format!("lsn {l} bytes {b}");
            (l >= 5.0 && b >= 5.0 * 4096.0).then_some(())
        },
    );
    let before = lag("lag_lsn", "r2");
    assert_all_ok(
        &nbd_ops(&p.uri(), &["w:131072:4096:7"]),
        "writes while r2 is down",
    );
    wait_until(30, "r2's lag to grow by the 7 new writes", |last| {
        let l = lag("lag_lsn", "r2");
        *last = l.to_string();
        (l >= before + 7.0).then_some(())
    });
    assert_eq!(lag("lag_lsn", "r1"), 0.0, "r1 is in sync");

    let r2_labels = [("volume", VOLUME), ("replica", "r2")];
    let active = ["pending", "firing"];
    let nis = prom.wait_alert("BlockrepReplicaNotInSync", &r2_labels, &["firing"], 30);
    let description = nis["annotations"]["description"].as_str().unwrap_or("");
    assert!(
        ["disconnected", "connecting", "handshake"]
            .iter()
            .any(|s| description.contains(&format!("it is now {s}"))),
        "the description names r2's state: {description}"
    );
    assert!(
        nis["annotations"]["summary"]
            .as_str()
            .unwrap_or("")
            .contains("r2"),
        "{nis}"
    );
    prom.wait_alert(
        "BlockrepFlushFailures",
        &[("volume", VOLUME), ("reason", "replica_missing")],
        &["firing"],
        30,
    );
    prom.wait_alert(
        "BlockrepTargetDown",
        &[("instance", r2.metrics_addr().as_str())],
        &["firing"],
        30,
    );
    // Lag in seconds counts from the first write r2 missed; the rule's threshold is 30 s.
    wait_until(60, "r2's lag in seconds to pass 30 s", |last| {
        let s = lag("lag_seconds", "r2");
        *last = s.to_string();
        (s > 30.0).then_some(())
    });
    prom.wait_alert("BlockrepReplicaLagging", &r2_labels, &active, 30);
    // Every active alert's annotations rendered (no template errors, labels filled in).
    for a in prom.alerts() {
        for key in ["summary", "description"] {
            let text = a["annotations"][key].as_str().unwrap_or("");
            assert!(
                !text.is_empty() && !text.contains("<error") && !text.contains("<no value>"),
                "{} {key}: {text:?}",
                a["labels"]["alertname"]
            );
        }
    }
    for alert in ["BlockrepReplicaNotInSync", "BlockrepReplicaLagging"] {
        assert!(
            prom.alert(alert, &[("replica", "r1")]).is_none(),
            "{alert} for r1, which is in sync: {:?}",
            prom.alerts()
        );
    }

    // Back: it catches up, the lag returns to 0, the alerts resolve.
    r2.restart();
    p.wait_replica_state("r2", "in_sync", 30);
    wait_until(30, "r2's lag to return to 0 in Prometheus", |last| {
        let v = (
            lag("lag_lsn", "r2"),
            lag("lag_bytes", "r2"),
            lag("lag_seconds", "r2"),
        );
        *last = format!("{v:?}");
        (v == (0.0, 0.0, 0.0)).then_some(())
    });
    wait_until(30, "the replica alerts for r2 to resolve", |last| {
        let left: Vec<Value> = [
            "BlockrepReplicaNotInSync",
            "BlockrepReplicaLagging",
            "BlockrepTargetDown",
        ]
        .iter()
        .filter_map(|a| prom.alert(a, &[]))
        .collect();
        *last = format!("{left:?}");
        left.is_empty().then_some(())
    });
    assert_all_ok(
        &nbd_ops(&p.uri(), &["w:0:4096:2", "f"]),
        "FLUSH with r2 back",
    );
}

/// Exact values: N writes of B bytes, M flushes and R reads through one connection move the
/// counters by exactly that much; the replica's durable LSN follows the primary's head; the
/// health endpoints answer.
#[test]
fn metric_values_count_exactly_the_requests_served() {
    require_python_nbd();
    require("timeout");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r1 = start_replica(&create_store_sized(dir, "r1", "32MiB"), "r1");
    let p = start_primary(&create_store_sized(dir, "p", "32MiB"), "p", &[&r1], &[]);
    p.wait_replica_state("r1", "in_sync", 30);
    for n in [&p, &r1] {
        for path in ["healthz", "readyz"] {
            let (status, body) = http_get(&format!("http://127.0.0.1:{}/{path}", n.metrics))
                .unwrap_or_else(|e| panic!("{}: {e}", n.name));
            assert_eq!(status, 200, "{} /{path}: {body}", n.name);
        }
    }

    const N: u64 = 37;
    const B: u64 = 12288;
    const M: u64 = 5;
    const R: u64 = 3;
    let op = |s: &Scrape, name: &str, op: &str| s.get(name, &[("volume", VOLUME), ("op", op)]);
    let barriers = |s: &Scrape| {
        s.get(
            "blockrep_barrier_duration_seconds_count",
            &[("volume", VOLUME), ("mode", "sync-all")],
        )
    };
    let before = p.scrape();
    let barriers_before = before
        .find(
            "blockrep_barrier_duration_seconds_count",
            &[("volume", VOLUME), ("mode", "sync-all")],
        )
        .unwrap_or(0.0);
    let head_before = before.get("blockrep_lsn", &[("volume", VOLUME), ("kind", "head")]);
    let writes = format!("w:0:{B}:{N}");
    let flushes = format!("f:{M}");
    let reads = format!("r:0:4096:{R}");
    let mut c = PausedClient::start(&p.uri(), &[&writes, &flushes, &reads, "pause"]);
    c.wait_line("paused", 60);
    assert!(
        c.seen
            .iter()
            .filter(|l| *l != "paused")
            .all(|l| l.starts_with("ok")),
        "client: {:?}",
        c.seen
    );

    let after = p.scrape();
    let d = |name: &str, o: &str| op(&after, name, o) - op(&before, name, o);
    assert_eq!(
        d("blockrep_nbd_requests_total", "write"),
        N as f64,
        "write requests"
    );
    assert_eq!(
        d("blockrep_nbd_bytes_total", "write"),
        (N * B) as f64,
        "write bytes"
    );
    assert_eq!(
        d("blockrep_nbd_requests_total", "flush"),
        M as f64,
        "flush requests"
    );
    assert_eq!(
        d("blockrep_nbd_requests_total", "read"),
        R as f64,
        "read requests"
    );
    assert_eq!(
        d("blockrep_nbd_bytes_total", "read"),
        (R * 4096) as f64,
        "read bytes"
    );
    assert_eq!(
        d("blockrep_nbd_request_duration_seconds_count", "write"),
        N as f64,
        "write latency observations"
    );
    for o in ["write", "flush", "read"] {
        assert_eq!(d("blockrep_nbd_errors_total", o), 0.0, "{o} errors");
    }
    assert_eq!(
        barriers(&after) - barriers_before,
        M as f64,
        "one barrier observation per FLUSH"
    );
    assert_eq!(
        after.get("blockrep_nbd_connections", &[("volume", VOLUME)]),
        1.0,
        "one client connected"
    );
    let head = after.get("blockrep_lsn", &[("volume", VOLUME), ("kind", "head")]);
    assert!(
        head - head_before >= N as f64,
        "head LSN moved by {} for {N} writes",
        head - head_before
    );
    // A FLUSH may be answered by a checkpoint (the data file's fdatasync makes the entries it
    // holds durable) while the WAL writer's last batch is still on its way to the file; that
    // batch is still written, so wait for it rather than read the counter once.
    let wal_bytes = |s: &Scrape| s.get("blockrep_wal_written_bytes_total", &[("volume", VOLUME)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut wal_after = wal_bytes(&after);
    while wal_after - wal_bytes(&before) < (N * B) as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        wal_after = wal_bytes(&p.scrape());
    }
    assert!(
        wal_after - wal_bytes(&before) >= (N * B) as f64,
        "the WAL holds at least the payload: {} bytes written for {} of payload",
        wal_after - wal_bytes(&before),
        N * B
    );
    // After the FLUSHes every write is durable on the primary and on r1 (sync-all).
    for kind in ["durable", "committed"] {
        assert_eq!(
            after.get("blockrep_lsn", &[("volume", VOLUME), ("kind", kind)]),
            head,
            "{kind} LSN after FLUSH"
        );
    }
    let rl = |name: &str| after.get(name, &[("volume", VOLUME), ("replica", "r1")]);
    assert_eq!(rl("blockrep_replica_durable_lsn"), head, "r1's durable LSN");
    assert_eq!(rl("blockrep_replica_lag_lsn"), 0.0);
    assert_eq!(rl("blockrep_replica_lag_bytes"), 0.0);
    assert_eq!(rl("blockrep_replica_lag_seconds"), 0.0);
    assert_eq!(
        after.get(
            "blockrep_replica_state",
            &[("volume", VOLUME), ("replica", "r1"), ("state", "in_sync")]
        ),
        1.0
    );
    assert_eq!(
        after.get("blockrep_role", &[("volume", VOLUME), ("role", "primary")]),
        1.0
    );
    assert_eq!(after.get("blockrep_epoch", &[("volume", VOLUME)]), 1.0);
    assert_eq!(after.get("blockrep_fenced", &[("volume", VOLUME)]), 0.0);
    let replica = r1.scrape();
    assert_eq!(
        replica.get("blockrep_lsn", &[("volume", VOLUME), ("kind", "durable")]),
        head,
        "the replica's own durable LSN"
    );
    assert_eq!(
        replica.get("blockrep_role", &[("volume", VOLUME), ("role", "replica")]),
        1.0
    );
    // The status report agrees with the metrics.
    let st = p.status();
    assert_eq!(st["head_lsn"].as_f64(), Some(head), "{st}");
    assert_eq!(st["volume"], VOLUME);

    c.resume_and_finish();
    let closed = p.scrape();
    assert_eq!(
        closed.get("blockrep_nbd_connections", &[("volume", VOLUME)]),
        0.0
    );
    assert_eq!(
        op(&closed, "blockrep_nbd_requests_total", "write")
            - op(&before, "blockrep_nbd_requests_total", "write"),
        N as f64,
        "no write counted at disconnect"
    );
}

/// The counters whose label values are known up front exist at 0 before their first event,
/// so `rate()`/`increase()` see the first failure or recovery (a series that appears with
/// the value 1 has no increase for Prometheus: the first burst of FLUSH failures would be
/// invisible to a rate-based alert).
#[test]
fn failure_and_recovery_counters_exist_at_zero_before_their_first_event() {
    require("timeout");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r1 = start_replica(&create_store_sized(dir, "r1", "32MiB"), "r1");
    let p = start_primary(&create_store_sized(dir, "p", "32MiB"), "p", &[&r1], &[]);
    p.wait_replica_state("r1", "in_sync", 30);
    let s = p.scrape();
    let mut missing = Vec::new();
    for reason in ["replica_missing", "quorum_lost", "fenced", "local"] {
        let labels = [("volume", VOLUME), ("mode", "sync-all"), ("reason", reason)];
        if s.find("blockrep_barrier_failures_total", &labels) != Some(0.0) {
            missing.push(format!("blockrep_barrier_failures_total{labels:?}"));
        }
    }
    for outcome in ["catch_up", "truncated", "rebuild_started", "rebuild_done"] {
        let labels = [("volume", VOLUME), ("outcome", outcome)];
        if s.find("blockrep_recovery_sessions_total", &labels) != Some(0.0) {
            missing.push(format!("blockrep_recovery_sessions_total{labels:?}"));
        }
    }
    assert!(
        missing.is_empty(),
        "counters absent until their first event (so the first one is lost to rate()):\n  {}",
        missing.join("\n  ")
    );
}

/// A node running `blockrep replica` reports the replica role from the start, in its
/// metrics and its status, not only after a primary has contacted it (a fresh replica that
/// says "primary" shows up as a second primary on the dashboard).
#[test]
fn a_replica_reports_the_replica_role_before_any_primary_connects() {
    require("timeout");
    let tmp = tempfile::tempdir().unwrap();
    let r = start_replica(&create_store_sized(tmp.path(), "r1", "32MiB"), "r1");
    let s = r.scrape();
    let role = |name: &str| s.get("blockrep_role", &[("volume", VOLUME), ("role", name)]);
    let status = r.status();
    assert!(
        role("replica") == 1.0 && role("primary") == 0.0 && status["role"] == "replica",
        "a replica process reports blockrep_role{{role=\"replica\"}} {}, {{role=\"primary\"}} {}, \
         status role {}",
        role("replica"),
        role("primary"),
        status["role"]
    );
}

/// promtool accepts alerts.yml; the dashboard is valid JSON with the expected variables and
/// panels; every metric either references exists in a live node's /metrics.
#[test]
fn promtool_accepts_the_rules_and_the_dashboard_references_only_live_metrics() {
    require_tools(&["promtool", "timeout"]);
    require_python_nbd();
    let rules = repo("metrics/prometheus/alerts.yml");
    let out = run(Command::new("timeout")
        .args(["60", "promtool", "check", "rules"])
        .arg(&rules));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules: {said}");
    assert!(said.contains("SUCCESS"), "{said}");

    let d = dashboard();
    assert!(
        (36..=41).contains(&d["schemaVersion"].as_i64().unwrap_or(0)),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["volume", "replica"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "${name}");
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or("");
        assert!(q.starts_with("label_values("), "${name}: {q}");
        assert!(q.ends_with(&format!(", {name})")), "${name}: {q}");
    }
    let exprs = dashboard_exprs(&d);
    for (title, e) in &exprs {
        assert!(
            e.contains(r#"volume=~"$volume""#),
            "{title} ignores $volume: {e}"
        );
    }
    let panel_types: Vec<(String, String)> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["type"].as_str().unwrap_or("").to_string(),
                p["title"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let timeline = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "state-timeline")
        .unwrap_or_else(|| panic!("no state-timeline panel: {panel_types:?}"));
    assert!(
        timeline["targets"][0]["expr"]
            .as_str()
            .unwrap_or("")
            .contains("blockrep_replica_state"),
        "{timeline}"
    );
    for p in d["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
        }
    }
    let joined: String = exprs
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needed in [
        "histogram_quantile(0.5, sum by (op, le) (rate(blockrep_nbd_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (op, le) (rate(blockrep_nbd_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (mode, le) (rate(blockrep_barrier_duration_seconds_bucket",
        "blockrep_barrier_failures_total",
        "blockrep_replica_lag_lsn",
        "blockrep_replica_lag_bytes",
        "blockrep_replica_lag_seconds",
        "blockrep_wal_used_bytes",
        "blockrep_wal_capacity_bytes",
        "blockrep_rebuild_progress_ratio",
        "blockrep_epoch",
        "blockrep_role",
        "blockrep_fenced",
    ] {
        assert!(joined.contains(needed), "no dashboard query uses {needed}");
    }

    // A live primary and replica, with every family populated: a FLUSH (barrier histogram),
    // a failed FLUSH (failure counter), a catch-up (recovery counter).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut r1 = start_replica(&create_store_sized(dir, "r1", "32MiB"), "r1");
    let p = start_primary(&create_store_sized(dir, "p", "32MiB"), "p", &[&r1], &[]);
    p.wait_replica_state("r1", "in_sync", 30);
    assert_all_ok(&nbd_ops(&p.uri(), &["w:0:4096:2", "f"]), "write + FLUSH");
    r1.proc.terminate_ok();
    let lines = nbd_ops(&p.uri(), &["w:0:4096:1", "f"]);
    assert!(lines.iter().any(|l| l == "err f EIO"), "{lines:?}");
    r1.restart();
    p.wait_replica_state("r1", "in_sync", 30);
    let mut live = families(&get_ok(&format!("http://127.0.0.1:{}/metrics", p.metrics)));
    live.extend(families(&get_ok(&format!(
        "http://127.0.0.1:{}/metrics",
        r1.metrics
    ))));
    let source = read(&repo("metrics/src/lib.rs"));
    let mut unknown = Vec::new();
    let alert_text = read(&rules);
    for (what, e) in exprs
        .iter()
        .map(|(t, e)| (format!("dashboard panel {t:?}"), e.clone()))
        .chain(std::iter::once(("alerts.yml".to_string(), alert_text)))
    {
        for name in metric_names(&e) {
            match family_of(&name, &live) {
                Some(f) => {
                    // And the family is one metrics/src/lib.rs defines.
                    let short = f.trim_start_matches("blockrep_");
                    assert!(
                        source.contains(&format!("\"{short}\"")),
                        "{f} is not defined in metrics/src/lib.rs"
                    );
                }
                None => unknown.push(format!("{what}: {name}")),
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metric names no live node exports:\n{}\nlive families: {:?}",
        unknown.join("\n"),
        live.keys().collect::<Vec<_>>()
    );
}

/// Removes the `annotations:` blocks (templates are checked by promtool check rules and by
/// a live Prometheus elsewhere), so promtool's unit tests compare labels only.
fn strip_annotations(text: &str) -> String {
    let mut out = Vec::new();
    let mut skip_deeper_than: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(level) = skip_deeper_than {
            if line.trim().is_empty() || indent > level {
                continue;
            }
            skip_deeper_than = None;
        }
        if line.trim_start() == "annotations:" {
            skip_deeper_than = Some(indent);
            continue;
        }
        out.push(line);
    }
    out.join("\n") + "\n"
}

/// The alert logic, on synthetic series with promtool's rule unit tests: each alert fires
/// when it should (after its `for:`), and stays quiet for the look-alike healthy cases — a
/// slow but progressing rebuild, a WAL briefly full, failures that are old news.
#[test]
fn alert_rules_fire_and_stay_quiet_as_specified() {
    require_tools(&["promtool", "timeout"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("rules.yml"),
        strip_annotations(&read(&repo("metrics/prometheus/alerts.yml"))),
    )
    .unwrap();
    let i = r#"job="blockrep",instance="p:9810",volume="vol1""#;
    let tests = format!(
        r#"rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  # WAL at 95% for 10 minutes fires after 5; at 80%, or at 95% for 3 minutes, never.
  - interval: 1m
    input_series:
      - series: 'blockrep_wal_used_bytes{{{i}}}'
        values: '95x12'
      - series: 'blockrep_wal_capacity_bytes{{{i}}}'
        values: '100x12'
      - series: 'blockrep_wal_used_bytes{{job="blockrep",instance="q:9810",volume="vol1"}}'
        values: '80x12'
      - series: 'blockrep_wal_capacity_bytes{{job="blockrep",instance="q:9810",volume="vol1"}}'
        values: '100x12'
      - series: 'blockrep_wal_used_bytes{{job="blockrep",instance="s:9810",volume="vol1"}}'
        values: '95 95 95 10x10'
      - series: 'blockrep_wal_capacity_bytes{{job="blockrep",instance="s:9810",volume="vol1"}}'
        values: '100x12'
    alert_rule_test:
      - eval_time: 4m
        alertname: BlockrepWALNearFull
        exp_alerts: []
      - eval_time: 10m
        alertname: BlockrepWALNearFull
        exp_alerts:
          - exp_labels: {{severity: warning, job: blockrep, instance: "p:9810", volume: vol1}}

  # Rebuilds: r1 reports no progress at all (fires 10 minutes in); r2 is slow but reports
  # every 5 minutes (quiet); r3 is in sync with a constant counter (quiet); r4 progresses for
  # 10 minutes, then stops (fires 25 minutes after its last report).
  - interval: 1m
    input_series:
      - series: 'blockrep_replica_state{{{i},replica="r1",state="rebuilding"}}'
        values: '1x40'
      - series: 'blockrep_rebuild_bytes{{{i},replica="r1"}}'
        values: '1000x40'
      - series: 'blockrep_replica_state{{{i},replica="r2",state="rebuilding"}}'
        values: '1x40'
      - series: 'blockrep_rebuild_bytes{{{i},replica="r2"}}'
        values: '0x4 64x4 128x4 192x4 256x4 320x4 384x4 448x4 512x4'
      - series: 'blockrep_replica_state{{{i},replica="r3",state="rebuilding"}}'
        values: '0x40'
      - series: 'blockrep_rebuild_bytes{{{i},replica="r3"}}'
        values: '0x40'
      - series: 'blockrep_replica_state{{{i},replica="r4",state="rebuilding"}}'
        values: '1x40'
      - series: 'blockrep_rebuild_bytes{{{i},replica="r4"}}'
        values: '0+64x10 704x30'
    alert_rule_test:
      - eval_time: 9m
        alertname: BlockrepRebuildStalled
        exp_alerts: []
      - eval_time: 11m
        alertname: BlockrepRebuildStalled
        exp_alerts:
          - exp_labels: {{severity: warning, job: blockrep, instance: "p:9810", volume: vol1, replica: r1}}
      - eval_time: 33m
        alertname: BlockrepRebuildStalled
        exp_alerts:
          - exp_labels: {{severity: warning, job: blockrep, instance: "p:9810", volume: vol1, replica: r1}}
      - eval_time: 36m
        alertname: BlockrepRebuildStalled
        exp_alerts:
          - exp_labels: {{severity: warning, job: blockrep, instance: "p:9810", volume: vol1, replica: r1}}
          - exp_labels: {{severity: warning, job: blockrep, instance: "p:9810", volume: vol1, replica: r4}}

  # FLUSH failures: a counter at 0 from the start (as blockrep exports it) that jumps to 3
  # at 21m (the first burst) fires at once and resolves 5 minutes later; one that was
  # already at 7 and never moves stays quiet; one that grows fires.
  - interval: 1m
    input_series:
      - series: 'blockrep_barrier_failures_total{{{i},mode="sync-all",reason="replica_missing"}}'
        values: '0x20 3x20'
      - series: 'blockrep_barrier_failures_total{{{i},mode="sync-all",reason="local"}}'
        values: '7x40'
      - series: 'blockrep_barrier_failures_total{{{i},mode="sync-quorum",reason="quorum_lost"}}'
        values: '0x29 1+1x10'
    alert_rule_test:
      - eval_time: 15m
        alertname: BlockrepFlushFailures
        exp_alerts: []
      - eval_time: 21m
        alertname: BlockrepFlushFailures
        exp_alerts:
          - exp_labels: {{severity: critical, job: blockrep, instance: "p:9810", volume: vol1, mode: sync-all, reason: replica_missing}}
      - eval_time: 27m
        alertname: BlockrepFlushFailures
        exp_alerts: []
      - eval_time: 32m
        alertname: BlockrepFlushFailures
        exp_alerts:
          - exp_labels: {{severity: critical, job: blockrep, instance: "p:9810", volume: vol1, mode: sync-quorum, reason: quorum_lost}}

  # Replica lag: 45 s of lag fires after 2 minutes, 10 s never; 2 GiB of lag fires.
  # Not in sync: r1 out of sync for 6 minutes fires, r2 back after 3 minutes does not.
  - interval: 1m
    input_series:
      - series: 'blockrep_replica_lag_seconds{{{i},replica="r1"}}'
        values: '45x10'
      - series: 'blockrep_replica_lag_bytes{{{i},replica="r1"}}'
        values: '0x10'
      - series: 'blockrep_replica_lag_seconds{{{i},replica="r2"}}'
        values: '10x10'
      - series: 'blockrep_replica_lag_bytes{{{i},replica="r2"}}'
        values: '0x10'
      - series: 'blockrep_replica_lag_seconds{{{i},replica="r3"}}'
        values: '0x10'
      - series: 'blockrep_replica_lag_bytes{{{i},replica="r3"}}'
        values: '2147483648x10'
      - series: 'blockrep_replica_state{{{i},replica="r1",state="in_sync"}}'
        values: '0x10'
      - series: 'blockrep_replica_state{{{i},replica="r2",state="in_sync"}}'
        values: '0 0 0 1x8'
      - series: 'blockrep_replica_state{{{i},replica="r3",state="in_sync"}}'
        values: '1x10'
    alert_rule_test:
      - eval_time: 1m
        alertname: BlockrepReplicaLagging
        exp_alerts: []
      - eval_time: 3m
        alertname: BlockrepReplicaLagging
        exp_alerts:
          - exp_labels: {{severity: warning, job: blockrep, instance: "p:9810", volume: vol1, replica: r1}}
          - exp_labels: {{severity: warning, job: blockrep, instance: "p:9810", volume: vol1, replica: r3}}
      - eval_time: 4m
        alertname: BlockrepReplicaNotInSync
        exp_alerts: []
      - eval_time: 6m
        alertname: BlockrepReplicaNotInSync
        exp_alerts:
          - exp_labels: {{severity: warning, job: blockrep, instance: "p:9810", volume: vol1, replica: r1}}

  # Fencing fires at once; a target down for 3 minutes fires, one down for 1 does not.
  - interval: 1m
    input_series:
      - series: 'blockrep_fenced{{{i}}}'
        values: '0 0 1x5'
      - series: 'blockrep_fenced{{job="blockrep",instance="n:9810",volume="vol1"}}'
        values: '0x7'
      - series: 'up{{job="blockrep",instance="p:9810"}}'
        values: '1 0 0 0 0 0'
      - series: 'up{{job="blockrep",instance="q:9811"}}'
        values: '1 0 1 1 1 1'
    alert_rule_test:
      - eval_time: 1m
        alertname: BlockrepFenced
        exp_alerts: []
      - eval_time: 2m
        alertname: BlockrepFenced
        exp_alerts:
          - exp_labels: {{severity: critical, job: blockrep, instance: "p:9810", volume: vol1}}
      - eval_time: 4m
        alertname: BlockrepTargetDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: blockrep, instance: "p:9810"}}
"#
    );
    let test_file = dir.join("alerts_test.yml");
    std::fs::write(&test_file, tests).unwrap();
    let check = run(Command::new("timeout")
        .args(["60", "promtool", "check", "rules"])
        .arg(dir.join("rules.yml")));
    assert!(
        check.status.success(),
        "the annotation-free copy must still be valid: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let out = run(Command::new("timeout")
        .args(["120", "promtool", "test", "rules"])
        .arg(&test_file));
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every alert in the file is exercised above.
    let text = read(&repo("metrics/prometheus/alerts.yml"));
    let test_text = read(&test_file);
    for line in text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            test_text.contains(&format!("alertname: {line}\n")),
            "alert {line} has no promtool unit test here"
        );
    }
}

// ---------------------------------------------------------------------------- systemd

/// The unit files under systemd/, each as (file name, text).
fn unit_files() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(repo("systemd"))
        .expect("systemd/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service") || n.ends_with(".mount"))
        .map(|n| {
            let t = read(&repo(&format!("systemd/{n}")));
            (n, t)
        })
        .collect();
    out.sort();
    out
}

/// `systemd-analyze verify` on every unit (templates instantiated for vol1) must exit 0
/// and say nothing at all (it only warns, exit 0, about unknown keys or bad values). The
/// installed path of blockrep does not exist here, so the copies point ExecStart at the
/// binary under test; nbd-client (Debian's nbd-client package) must be installed.
#[test]
fn systemd_units_verify() {
    require_tools(&[
        "systemd-analyze",
        "timeout",
        "/usr/sbin/nbd-client",
        "/sbin/modprobe",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let units = unit_files();
    let names: Vec<&str> = units.iter().map(|(n, _)| n.as_str()).collect();
    for needed in [
        "blockrep-primary@.service",
        "blockrep-replica@.service",
        "blockrep-attach@.service",
        "srv-vol1.mount",
    ] {
        assert!(
            names.contains(&needed),
            "systemd/{needed} missing: {names:?}"
        );
    }
    let mut to_verify = Vec::new();
    for (name, text) in &units {
        std::fs::write(dir.join(name), text.replace("/usr/local/bin/blockrep", BIN)).unwrap();
        let instance = name.replace("@.", "@vol1.");
        if instance != *name {
            std::os::unix::fs::symlink(dir.join(name), dir.join(&instance)).unwrap();
        }
        to_verify.push(dir.join(instance));
    }
    let verify = |paths: &[PathBuf]| {
        let out = run(Command::new("timeout")
            .args(["120", "systemd-analyze", "verify", "--man=no"])
            .args(paths)
            .current_dir(dir)
            .env("SYSTEMD_LOG_COLOR", "0")
            .stdin(Stdio::null()));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    };
    let (ok, said) = verify(&to_verify);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify {to_verify:?}: ok={ok}\n{said}"
    );

    // The check bites: a typo'd directive value and an unknown key are reported.
    let bad = dir.join("bad");
    std::fs::create_dir(&bad).unwrap();
    let broken = units
        .iter()
        .find(|(n, _)| n == "blockrep-primary@.service")
        .unwrap()
        .1
        .replace("/usr/local/bin/blockrep", BIN)
        .replace("Type=notify", "Type=notfiy\nWatchdogSecs=30s");
    std::fs::write(bad.join("broken@.service"), broken).unwrap();
    std::os::unix::fs::symlink(bad.join("broken@.service"), bad.join("broken@vol1.service"))
        .unwrap();
    let (_, said) = verify(&[bad.join("broken@vol1.service")]);
    assert!(
        said.contains("notfiy") && said.contains("WatchdogSecs"),
        "verify must flag the broken copy: {said}"
    );

    // What the operations side relies on, unit by unit.
    let get = |name: &str| &units.iter().find(|(n, _)| n == name).unwrap().1;
    for (unit, cmd) in [
        ("blockrep-primary@.service", "serve"),
        ("blockrep-replica@.service", "replica"),
    ] {
        let t = get(unit);
        for line in [
            format!("ExecStart=/usr/local/bin/blockrep {cmd} --config /etc/blockrep/%i.toml"),
            "Type=notify".into(),
            "NotifyAccess=main".into(),
            "Restart=on-failure".into(),
            "KillSignal=SIGTERM".into(),
            "NoNewPrivileges=yes".into(),
            "ProtectSystem=strict".into(),
            "ReadWritePaths=/var/lib/blockrep".into(),
            "PrivateTmp=yes".into(),
            "ProtectHome=yes".into(),
            "User=blockrep".into(),
            "Group=blockrep".into(),
        ] {
            assert!(t.lines().any(|l| l == line), "{unit} lacks {line}");
        }
        for key in ["WatchdogSec=", "TimeoutStopSec="] {
            assert!(t.lines().any(|l| l.starts_with(key)), "{unit} lacks {key}");
        }
        // Nothing that breaks io_uring or listening sockets.
        let filter = t
            .lines()
            .filter_map(|l| l.strip_prefix("SystemCallFilter="))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            !filter.contains("~@aio") && !filter.contains("io_uring"),
            "{unit}: the system call filter must allow io_uring: {filter}"
        );
        let families = t
            .lines()
            .filter_map(|l| l.strip_prefix("RestrictAddressFamilies="))
            .collect::<Vec<_>>()
            .join(" ");
        for f in ["AF_INET", "AF_INET6", "AF_UNIX"] {
            assert!(
                families.split_whitespace().any(|x| x == f),
                "{unit}: {families}"
            );
        }
    }
    let attach = get("blockrep-attach@.service");
    assert!(attach.contains("EnvironmentFile=/etc/blockrep/%i.attach"));
    assert!(attach.contains("ExecStart=/usr/sbin/nbd-client "));
    assert!(attach.contains("ExecStop=/usr/sbin/nbd-client -d ${NBD_DEVICE}"));
    let mount = get("srv-vol1.mount");
    for line in [
        "Requires=blockrep-attach@vol1.service",
        "After=blockrep-attach@vol1.service",
        "What=/dev/nbd0",
        "Where=/srv/vol1",
    ] {
        assert!(
            mount.lines().any(|l| l == line),
            "srv-vol1.mount lacks {line}"
        );
    }
    // The attach example's variables are the ones the unit uses.
    let env = read(&repo("systemd/examples/vol1.attach"));
    for var in [
        "NBD_HOST",
        "NBD_PORT",
        "NBD_EXPORT",
        "NBD_DEVICE",
        "NBD_TIMEOUT",
        "NBD_OPTIONS",
    ] {
        assert!(attach.contains(var), "the attach unit does not use {var}");
        assert!(
            env.lines().any(|l| l.starts_with(&format!("{var}="))),
            "vol1.attach does not set {var}"
        );
    }
}

// ---------------------------------------------------------------------------- sd_notify

/// A NOTIFY_SOCKET for one child: every datagram it sends, with when it arrived.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    got: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind(dir: &Path, name: &str) -> NotifySocket {
        let path = dir.join(format!("{name}.notify"));
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        NotifySocket {
            sock,
            path,
            got: Vec::new(),
        }
    }

    /// Receives until a datagram contains `needle` (returns it), or `secs` pass (None).
    fn wait_for(&mut self, needle: &str, secs: f64) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.got.push((Instant::now(), msg.clone()));
                if msg.lines().any(|l| l == needle) {
                    return Some(msg);
                }
            }
        }
        None
    }

    fn count(&self, needle: &str) -> usize {
        self.got
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == needle))
            .count()
    }
}

/// The ExecStart= command line of a unit, with the installed binary and config replaced.
fn exec_start(unit: &str, config: &Path) -> Vec<String> {
    let text = read(&repo(&format!("systemd/{unit}")));
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{unit} has no ExecStart="));
    line.split_whitespace()
        .map(|w| match w {
            "/usr/local/bin/blockrep" => BIN.to_string(),
            "/etc/blockrep/%i.toml" => config.display().to_string(),
            other => other.to_string(),
        })
        .collect()
}

fn spawn_notified(
    name: &str,
    argv: &[String],
    notify: &Path,
    env: &[(&str, &str)],
    log: &Path,
) -> Proc {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("NOTIFY_SOCKET", notify)
        .env("NO_COLOR", "1")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(name, &mut cmd, log)
}

/// The NBD greeting ("NBDMAGIC") on `port`, read from a fresh connection.
fn nbd_greeting(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&magic).into_owned())
}

/// `blockrep serve` and `blockrep replica`, started with their units' ExecStart= lines and a
/// NOTIFY_SOCKET: READY=1 arrives, and when it does the NBD (or replication) port accepts
/// connections and /readyz is 200; SIGTERM brings STOPPING=1 and exit 0. A start that fails
/// (port taken) never says READY=1. With WATCHDOG_USEC=200000 and WATCHDOG_PID = the
/// process, WATCHDOG=1 arrives every ~100 ms; with WATCHDOG_PID of another process, never.
#[test]
fn readiness_notification_is_sent() {
    require_tools(&["timeout", "sh"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = create_store_sized(dir, "p", "32MiB");
    let (nbd, metrics) = (free_port(), free_port());
    let config = dir.join("p.toml");
    std::fs::write(
        &config,
        format!(
            "dir = \"{}\"\nnbd = [\"127.0.0.1:{nbd}\"]\nmetrics = \"127.0.0.1:{metrics}\"\nvolume-name = \"{VOLUME}\"\n",
            store.display()
        ),
    )
    .unwrap();
    let argv = exec_start("blockrep-primary@.service", &config);

    // serve: READY=1 once the port accepts, STOPPING=1 on SIGTERM.
    let mut n = NotifySocket::bind(dir, "serve");
    let mut p = spawn_notified("serve", &argv, &n.path, &[], &dir.join("serve.log"));
    let ready = n
        .wait_for("READY=1", 90.0)
        .unwrap_or_else(|| panic!("no READY=1 from serve; log:\n{}", p.log_text()));
    assert_eq!(
        nbd_greeting(nbd).as_deref(),
        Ok("NBDMAGIC"),
        "the NBD port must serve when READY=1 arrives"
    );
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{metrics}/readyz")).map(|r| r.0),
        Ok(200),
        "/readyz when READY=1 arrives"
    );
    assert!(
        ready.contains("STATUS="),
        "a status line with READY=1: {ready:?}"
    );
    assert!(
        n.wait_for("WATCHDOG=1", 1.0).is_none(),
        "no watchdog pings without WATCHDOG_USEC"
    );
    p.signal(libc::SIGTERM);
    assert!(
        n.wait_for("STOPPING=1", 60.0).is_some(),
        "no STOPPING=1 after SIGTERM: {:?}; log:\n{}",
        n.got,
        p.log_text()
    );
    let st = p.terminate(60);
    assert!(st.success(), "serve after SIGTERM: {st}");
    assert_eq!(n.count("READY=1"), 1, "{:?}", n.got);

    // A start that fails never claims readiness.
    let blocker = std::net::TcpListener::bind(("127.0.0.1", nbd)).expect("take the NBD port");
    let mut n2 = NotifySocket::bind(dir, "serve-busy");
    let mut p2 = spawn_notified(
        "serve-busy",
        &argv,
        &n2.path,
        &[],
        &dir.join("serve-busy.log"),
    );
    let st = wait_until(60, "serve with its port taken to exit", |_| {
        p2.child.as_mut().unwrap().try_wait().unwrap()
    });
    p2.child = None;
    assert_eq!(
        st.code(),
        Some(1),
        "port taken: {st}; log:\n{}",
        p2.log_text()
    );
    assert!(
        n2.wait_for("READY=1", 0.5).is_none(),
        "READY=1 from a failed start: {:?}",
        n2.got
    );
    drop(blocker);

    // The watchdog, with WATCHDOG_PID set to the process itself (as systemd does).
    let mut wargv: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        "WATCHDOG_PID=$$ exec \"$0\" \"$@\"".into(),
    ];
    wargv.extend(argv.iter().cloned());
    let mut n3 = NotifySocket::bind(dir, "serve-watchdog");
    let mut p3 = spawn_notified(
        "serve-watchdog",
        &wargv,
        &n3.path,
        &[("WATCHDOG_USEC", "200000")],
        &dir.join("serve-watchdog.log"),
    );
    n3.wait_for("READY=1", 90.0)
        .unwrap_or_else(|| panic!("no READY=1; log:\n{}", p3.log_text()));
    let from = Instant::now();
    n3.wait_for("never", 1.5);
    let pings = n3
        .got
        .iter()
        .filter(|(t, m)| *t >= from && m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        (8..=30).contains(&pings),
        "WATCHDOG=1 every ~100 ms for 1.5 s (WATCHDOG_USEC=200000): got {pings}"
    );
    p3.terminate_ok();

    // A WATCHDOG_PID naming another process is not for us: no pings.
    let mut n4 = NotifySocket::bind(dir, "serve-otherpid");
    let mut p4 = spawn_notified(
        "serve-otherpid",
        &argv,
        &n4.path,
        &[("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")],
        &dir.join("serve-otherpid.log"),
    );
    n4.wait_for("READY=1", 90.0)
        .unwrap_or_else(|| panic!("no READY=1; log:\n{}", p4.log_text()));
    assert!(
        n4.wait_for("WATCHDOG=1", 1.0).is_none(),
        "pings for another pid's watchdog"
    );
    p4.terminate_ok();

    // replica: READY=1 once the replication port accepts; STOPPING=1 on SIGTERM.
    let (listen, rmetrics) = (free_port(), free_port());
    let rconfig = dir.join("r.toml");
    std::fs::write(
        &rconfig,
        format!(
            "dir = \"{}\"\nlisten = \"127.0.0.1:{listen}\"\nsize = \"32MiB\"\nmetrics = \"127.0.0.1:{rmetrics}\"\nvolume-name = \"{VOLUME}\"\n",
            dir.join("r").display()
        ),
    )
    .unwrap();
    let rargv = exec_start("blockrep-replica@.service", &rconfig);
    let mut wrargv: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        "WATCHDOG_PID=$$ exec \"$0\" \"$@\"".into(),
    ];
    wrargv.extend(rargv.iter().cloned());
    let mut n5 = NotifySocket::bind(dir, "replica");
    let mut r = spawn_notified(
        "replica",
        &wrargv,
        &n5.path,
        &[("WATCHDOG_USEC", "200000")],
        &dir.join("replica.log"),
    );
    n5.wait_for("READY=1", 90.0)
        .unwrap_or_else(|| panic!("no READY=1 from replica; log:\n{}", r.log_text()));
    assert!(
        TcpStream::connect(("127.0.0.1", listen)).is_ok(),
        "the replication port must accept when READY=1 arrives"
    );
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{rmetrics}/readyz")).map(|r| r.0),
        Ok(200)
    );
    assert!(
        n5.wait_for("WATCHDOG=1", 2.0).is_some(),
        "replica watchdog pings"
    );
    r.signal(libc::SIGTERM);
    assert!(
        n5.wait_for("STOPPING=1", 60.0).is_some(),
        "no STOPPING=1 from replica: {:?}; log:\n{}",
        n5.got,
        r.log_text()
    );
    let st = r.terminate(60);
    assert!(st.success(), "replica after SIGTERM: {st}");
}

// ---------------------------------------------------------------------------- --config

fn admin_volume_names(metrics: u16) -> BTreeSet<String> {
    Scrape::of(metrics)
        .0
        .iter()
        .filter_map(|s| s.labels.get("volume").cloned())
        .collect()
}

fn refused(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

/// Runs blockrep with `args`, which must fail with exit 1 and a message containing every
/// one of `needles`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = run(Command::new("timeout")
        .args(["60", BIN])
        .args(args)
        .stdin(Stdio::null()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: {}\n{stderr}",
        out.status
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "{args:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
}

/// `--config FILE` for serve and replica: the file's dir/nbd/listen/metrics/volume-name are
/// used; a flag on the command line wins over the file; an unknown key (or a bad value) is an
/// error with exit 1 that names it; the example configs in systemd/examples work.
#[test]
fn config_file_sets_defaults_and_flags_override() {
    require_tools(&["timeout"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = create_store_sized(dir, "p", "32MiB");
    let (nbd, metrics) = (free_port(), free_port());
    let config = dir.join("p.toml");
    std::fs::write(
        &config,
        format!(
            "dir = \"{}\"\nnbd = [\"127.0.0.1:{nbd}\"]\nmetrics = \"127.0.0.1:{metrics}\"\nvolume-name = \"fromfile\"\n",
            store.display()
        ),
    )
    .unwrap();
    let cfg = config.display().to_string();

    // Everything from the file.
    let args = vec!["serve".to_string(), "--config".into(), cfg.clone()];
    let mut n = Node::launch("serve-file", &store, nbd, metrics, args);
    assert_eq!(nbd_greeting(nbd).as_deref(), Ok("NBDMAGIC"));
    assert_eq!(
        admin_volume_names(metrics),
        BTreeSet::from(["fromfile".to_string()])
    );
    assert_eq!(n.status()["store"], store.display().to_string());
    n.proc.terminate_ok();

    // Flags win: --nbd, --metrics, --volume-name, and the DIR argument over `dir`.
    let other_store = create_store_sized(dir, "q", "32MiB");
    let (nbd2, metrics2) = (free_port(), free_port());
    let args = vec![
        "serve".to_string(),
        other_store.display().to_string(),
        "--config".into(),
        cfg.clone(),
        "--nbd".into(),
        format!("127.0.0.1:{nbd2}"),
        "--metrics".into(),
        format!("127.0.0.1:{metrics2}"),
        "--volume-name".into(),
        "fromflag".into(),
    ];
    let mut n = Node::launch("serve-flags", &other_store, nbd2, metrics2, args);
    assert_eq!(nbd_greeting(nbd2).as_deref(), Ok("NBDMAGIC"));
    assert_eq!(
        admin_volume_names(metrics2),
        BTreeSet::from(["fromflag".to_string()])
    );
    assert_eq!(n.status()["store"], other_store.display().to_string());
    assert!(refused(nbd), "the file's NBD address must not be used");
    assert!(
        refused(metrics),
        "the file's metrics address must not be used"
    );
    n.proc.terminate_ok();

    // replica: a blank store of `size` in `dir`, on `listen`; --listen wins.
    let (listen, rmetrics, listen2) = (free_port(), free_port(), free_port());
    let rstore = dir.join("r");
    let rconfig = dir.join("r.toml");
    std::fs::write(
        &rconfig,
        format!(
            "dir = \"{}\"\nlisten = \"127.0.0.1:{listen}\"\nsize = \"32MiB\"\nmetrics = \"127.0.0.1:{rmetrics}\"\nvolume-name = \"repfile\"\n",
            rstore.display()
        ),
    )
    .unwrap();
    let rcfg = rconfig.display().to_string();
    let args = vec!["replica".to_string(), "--config".into(), rcfg.clone()];
    let mut r = Node::launch("replica-file", &rstore, listen, rmetrics, args);
    assert!(rstore.is_dir(), "the replica created its store from `size`");
    assert_eq!(
        admin_volume_names(rmetrics),
        BTreeSet::from(["repfile".to_string()])
    );
    r.proc.terminate_ok();
    let args = vec![
        "replica".to_string(),
        "--config".into(),
        rcfg.clone(),
        "--listen".into(),
        format!("127.0.0.1:{listen2}"),
    ];
    let mut r = Node::launch("replica-flags", &rstore, listen2, rmetrics, args);
    assert!(
        refused(listen),
        "the file's listen address must not be used"
    );
    r.proc.terminate_ok();

    // Unknown keys and bad values: exit 1, naming the key and the file.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        format!("dir = \"{}\"\ncolour = \"blue\"\n", store.display()),
    )
    .unwrap();
    let b = bad.display().to_string();
    fails_with(&["serve", "--config", &b], &["colour", &b]);
    fails_with(&["replica", "--config", &b], &["colour", &b]);
    std::fs::write(
        &bad,
        format!(
            "dir = \"{}\"\nflush-interval-ms = \"soon\"\n",
            store.display()
        ),
    )
    .unwrap();
    fails_with(&["serve", "--config", &b], &["flush-interval-ms", &b]);
    std::fs::write(
        &bad,
        format!("dir = \"{}\"\ncommit = \"sometimes\"\n", store.display()),
    )
    .unwrap();
    fails_with(&["serve", "--config", &b], &["commit", "sometimes"]);
    fails_with(
        &[
            "serve",
            "--config",
            &dir.join("missing.toml").display().to_string(),
        ],
        &["missing.toml"],
    );

    // The examples, pointed at loopback and temporary stores (nothing else changed): two
    // replicas from vol1.replica.toml, the primary from vol1.toml, all in sync.
    let example = |name: &str| -> toml::Table {
        read(&repo(&format!("systemd/examples/{name}")))
            .parse()
            .unwrap_or_else(|e| panic!("systemd/examples/{name}: {e}"))
    };
    let mut reps = Vec::new();
    for rname in ["r1", "r2"] {
        let mut t = example("vol1.replica.toml");
        let (l, m) = (free_port(), free_port());
        let store = dir.join(format!("ex-{rname}"));
        for (k, v) in [
            ("dir", store.display().to_string()),
            ("listen", format!("127.0.0.1:{l}")),
            ("metrics", format!("127.0.0.1:{m}")),
            ("size", "64MiB".to_string()),
        ] {
            assert!(t.contains_key(k), "vol1.replica.toml has no {k}");
            t.insert(k.into(), toml::Value::String(v));
        }
        let path = dir.join(format!("ex-{rname}.toml"));
        std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
        let args = vec![
            "replica".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        reps.push((rname, Node::launch(rname, &store, l, m, args)));
    }
    let mut t = example("vol1.toml");
    let pstore = create_store_sized(dir, "ex-p", "64MiB");
    let (pn, pm) = (free_port(), free_port());
    let replicas: Vec<toml::Value> = reps
        .iter()
        .map(|(name, r)| toml::Value::String(format!("{name}={}", r.addr())))
        .collect();
    for (k, v) in [
        ("dir", toml::Value::String(pstore.display().to_string())),
        (
            "nbd",
            toml::Value::Array(vec![toml::Value::String(format!("127.0.0.1:{pn}"))]),
        ),
        ("metrics", toml::Value::String(format!("127.0.0.1:{pm}"))),
        ("replica", toml::Value::Array(replicas)),
    ] {
        assert!(t.contains_key(k), "vol1.toml has no {k}");
        t.insert(k.into(), v);
    }
    let path = dir.join("ex-p.toml");
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    let args = vec![
        "serve".to_string(),
        "--config".into(),
        path.display().to_string(),
    ];
    let p = Node::launch("ex-p", &pstore, pn, pm, args);
    p.wait_replica_state("r1", "in_sync", 30);
    p.wait_replica_state("r2", "in_sync", 30);
    let st = p.status();
    assert_eq!(st["volume"], "vol1", "{st}");
    assert_eq!(st["commit_mode"], "sync-all", "{st}");
    for (_, r) in &reps {
        assert_eq!(r.status()["volume"], "vol1");
    }
}
