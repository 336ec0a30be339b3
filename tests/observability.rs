//! The operations side, end to end: real `blockrep` processes on loopback scraped by a real
//! Prometheus (Debian's `prometheus` package) that loads `metrics/prometheus/alerts.yml`;
//! every expression of the Grafana dashboard (`metrics/grafana/blockrep.json`) and every
//! alert evaluated against them; the alerts firing when a replica stops; exact metric values
//! after a known number of requests; the status report; `promtool` on the rules (syntax and
//! unit tests). The systemd units and sd_notify are in systemd.rs, `--config FILE` in
//! config_file.rs.
//!
//! Every tool is required, never skipped (`scripts/test` installs them). Every child process
//! is killed when its guard drops and also (PR_SET_PDEATHSIG) when the test thread that
//! started it ends; every wait has a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::admin::{agent, families, get_ok, http_get, launch_admin, AdminNode, Scrape};
use common::*;
use serde_json::Value;

const VOLUME: &str = "vol1";
/// Short barrier timeout, so a FLUSH that cannot be met fails fast.
const BARRIER_MS: &str = "1500";

// ---------------------------------------------------------------------------- tools

fn require_tools(tools: &[&str]) {
    for t in tools {
        require(t);
    }
}

// ---------------------------------------------------------------------------- nodes

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
    launch_admin(name, store, port, metrics, args)
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
    launch_admin(name, store, port, metrics, args)
}

/// The NBD URI of the volume (its export is named `blockrep`).
fn uri(n: &Node) -> String {
    n.export_uri("blockrep")
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
    /// Runs until this is dropped.
    _proc: Node,
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
        let args: Vec<OsString> = vec![
            format!("--config.file={}", config.display()).into(),
            format!("--storage.tsdb.path={}", dir.join("data").display()).into(),
            format!("--web.listen-address=127.0.0.1:{port}").into(),
            "--storage.tsdb.retention.time=1h".into(),
            "--log.level=warn".into(),
        ];
        let mut proc = Node::builder("prometheus", &dir, port, args)
            .bin(Path::new("prometheus"))
            .log(dir.join("prometheus.log"))
            .ready(Ready::Started)
            .color()
            .start();
        let url = format!("http://127.0.0.1:{port}/-/ready");
        let log = proc.log_path.clone();
        wait_until(
            Duration::from_secs(60),
            format_args!(
                "prometheus did not become ready; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
            || {
                assert!(proc.running(), "prometheus exited; log:\n{}", proc.log());
                matches!(http_get(&url), Ok((200, _)))
            },
        );
        Prometheus { _proc: proc, port }
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
            Duration::from_secs(secs),
            format!("Prometheus to return data for {expr}"),
            || {
                let r = self.query_ok(expr);
                let seen: String = format!("{r:?}");
                (!r.is_empty()).then_some(r).ok_or(seen)
            },
        )
    }

    /// The time of the latest scrape of `instance` (the timestamp of its `up` sample).
    fn last_scrape(&self, instance: &str) -> Option<f64> {
        let r = self.query_ok(&format!(r#"timestamp(up{{instance="{instance}"}})"#));
        r.first().map(value_of)
    }

    /// Waits until Prometheus has scraped `instance` `n` more times from now on.
    fn wait_scrapes(&self, instance: &str, n: usize, secs: u64) {
        let mut seen = self.last_scrape(instance);
        let mut more = 0;
        wait_until(
            Duration::from_secs(secs),
            format_args!("{n} more scrapes of {instance}"),
            || {
                let now = self.last_scrape(instance);
                if now.is_some() && now != seen {
                    seen = now;
                    more += 1;
                }
                more >= n
            },
        );
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
            Duration::from_secs(secs),
            format!("alert {name}{labels:?} in {states:?}"),
            || {
                let a = self.alert(name, labels);
                let seen: String = format!("{:?}", self.alerts());
                a.filter(|a| states.iter().any(|s| a["state"] == *s))
                    .ok_or(seen)
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

/// The families only `blockrep node` (an etcd-led volume) exports; the static nodes this file
/// runs never do. tests/failover.rs checks that a live node exports every one of them.
const CONTROL_PLANE_FAMILIES: [&str; 6] = [
    "blockrep_leader",
    "blockrep_lease_remaining_seconds",
    "blockrep_failovers_total",
    "blockrep_fence_events_total",
    "blockrep_failsafe_active",
    "blockrep_etcd_request_seconds",
];

/// Whether a dashboard expression is about the control plane only.
fn is_control_plane(expr: &str) -> bool {
    let names = metric_names(expr);
    !names.is_empty() && names.iter().all(|n| control_plane_family(n).is_some())
}

fn control_plane_family(name: &str) -> Option<String> {
    CONTROL_PLANE_FAMILIES
        .iter()
        .find(|f| name == **f || name.strip_prefix(**f).is_some_and(|s| s.starts_with('_')))
        .map(|f| f.to_string())
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
    const MAY_BE_EMPTY: [(&str, &str); 7] = [
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
        (
            "BlockrepNoLeader",
            "a control-plane rule: static nodes export no blockrep_leader; the promtool unit \
             test covers it, tests/failover.rs checks a blockrep node exports its families",
        ),
        (
            "BlockrepLeaderFlapping",
            "a control-plane rule (see BlockrepNoLeader)",
        ),
        (
            "BlockrepLeaseAboutToExpire",
            "a control-plane rule (see BlockrepNoLeader)",
        ),
        (
            "BlockrepFailsafeActive",
            "a control-plane rule (see BlockrepNoLeader)",
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
    fio_with_flushes(&uri(&p), 5, dir);

    // A replica outage: FLUSHes fail (sync-all), then it catches up.
    r2.stop_ok();
    let lines = nbd_ops(&uri(&p), &["w:0:4096:4", "f"]);
    assert!(
        lines.iter().any(|l| l.starts_with("err f EIO")),
        "a FLUSH with a replica down under sync-all must fail: {lines:?}"
    );
    r2.restart();
    p.wait_replica_state("r2", "in_sync", 30);

    // A rebuild: r2 comes back blank (a replaced disk), and is rebuilt at 1 MiB/s; then it
    // hangs (SIGSTOP) mid-rebuild, so the rebuild stalls.
    r2.stop_ok();
    std::fs::remove_dir_all(&r2.store).unwrap();
    r2.args.extend(["--size".into(), size.into()]);
    r2.restart();
    p.wait_replica_state("r2", "rebuilding", 30);
    r2.signal(libc::SIGSTOP);
    prom.wait_nonempty(
        r#"blockrep_replica_state{replica="r2", state="rebuilding"} == 1"#,
        30,
    );
    prom.wait_nonempty(r#"up{job="blockrep"} == 0"#, 30);
    // Every series of the primary scraped at least twice since the outage ended.
    prom.wait_scrapes(&p.metrics_addr(), 2, 30);

    // Every dashboard expression.
    let d = dashboard();
    let exprs = dashboard_exprs(&d);
    assert!(exprs.len() >= 20, "only {} dashboard queries", exprs.len());
    let mut failures = Vec::new();
    for (title, expr) in &exprs {
        if is_control_plane(expr) {
            continue;
        }
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
    r2.signal(libc::SIGCONT);
    p.wait_replica_state("r2", "in_sync", 120);
    r1.stop_ok();
    let new_primary = start_primary_on(&r1.store, "r1p", spare_metrics, &[&r2], &[]);
    assert!(
        new_primary.status()["epoch"].as_u64() == Some(2),
        "the promoted primary serves at epoch 2: {}",
        new_primary.status()
    );
    // The old primary learns of the new epoch when it next talks to r2.
    let lines = nbd_ops(&uri(&p), &["w:0:4096:1", "f"]);
    assert!(
        lines.iter().any(|l| l.starts_with("err")),
        "the old primary must refuse after the promotion: {lines:?}"
    );
    wait_until(
        Duration::from_secs(30),
        "the old primary to report itself fenced",
        || {
            let v = p.scrape().get("blockrep_fenced", &[("volume", VOLUME)]);
            let seen: String = v.to_string();
            (v == 1.0).then_some(()).ok_or(seen)
        },
    );
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
        &nbd_ops(&uri(&p), &["w:0:4096:8", "f"]),
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

    r2.stop_ok();
    let lines = nbd_ops(&uri(&p), &["w:65536:4096:5", "f"]);
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
        Duration::from_secs(30),
        "r2's lag in entries and bytes to show in Prometheus",
        || {
            let (l, b) = (lag("lag_lsn", "r2"), lag("lag_bytes", "r2"));
            let seen: String = format!("lsn {l} bytes {b}");
            (l >= 5.0 && b >= 5.0 * 4096.0).then_some(()).ok_or(seen)
        },
    );
    let before = lag("lag_lsn", "r2");
    assert_all_ok(
        &nbd_ops(&uri(&p), &["w:131072:4096:7"]),
        "writes while r2 is down",
    );
    wait_until(
        Duration::from_secs(30),
        "r2's lag to grow by the 7 new writes",
        || {
            let l = lag("lag_lsn", "r2");
            let seen: String = l.to_string();
            (l >= before + 7.0).then_some(()).ok_or(seen)
        },
    );
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
    wait_until(
        Duration::from_secs(60),
        "r2's lag in seconds to pass 30 s",
        || {
            let s = lag("lag_seconds", "r2");
            let seen: String = s.to_string();
            (s > 30.0).then_some(()).ok_or(seen)
        },
    );
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
    wait_until(
        Duration::from_secs(30),
        "r2's lag to return to 0 in Prometheus",
        || {
            let v = (
                lag("lag_lsn", "r2"),
                lag("lag_bytes", "r2"),
                lag("lag_seconds", "r2"),
            );
            let seen: String = format!("{v:?}");
            (v == (0.0, 0.0, 0.0)).then_some(()).ok_or(seen)
        },
    );
    wait_until(
        Duration::from_secs(30),
        "the replica alerts for r2 to resolve",
        || {
            let left: Vec<Value> = [
                "BlockrepReplicaNotInSync",
                "BlockrepReplicaLagging",
                "BlockrepTargetDown",
            ]
            .iter()
            .filter_map(|a| prom.alert(a, &[]))
            .collect();
            let seen: String = format!("{left:?}");
            left.is_empty().then_some(()).ok_or(seen)
        },
    );
    assert_all_ok(
        &nbd_ops(&uri(&p), &["w:0:4096:2", "f"]),
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
            let (status, body) = http_get(&format!("http://127.0.0.1:{}/{path}", n.metrics_port()))
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
    let mut c = PausedClient::start(&uri(&p), &[&writes, &flushes, &reads, "pause"]);
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
    let mut wal_after = wal_bytes(&after);
    let _ = poll_until(Duration::from_secs(10), || {
        if wal_after - wal_bytes(&before) >= (N * B) as f64 {
            return Some(());
        }
        wal_after = wal_bytes(&p.scrape());
        None
    });
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
    for reason in [
        "replica_missing",
        "quorum_lost",
        "fenced",
        "replica_no_space",
        "local",
    ] {
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
    assert_all_ok(&nbd_ops(&uri(&p), &["w:0:4096:2", "f"]), "write + FLUSH");
    r1.stop_ok();
    let lines = nbd_ops(&uri(&p), &["w:0:4096:1", "f"]);
    assert!(lines.iter().any(|l| l == "err f EIO"), "{lines:?}");
    r1.restart();
    p.wait_replica_state("r1", "in_sync", 30);
    let mut live = families(&get_ok(&format!(
        "http://127.0.0.1:{}/metrics",
        p.metrics_port()
    )));
    live.extend(families(&get_ok(&format!(
        "http://127.0.0.1:{}/metrics",
        r1.metrics_port()
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
            let family = family_of(&name, &live).or_else(|| control_plane_family(&name));
            match family {
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

  # The control plane. vol1: n1 leads, then nobody for 3 minutes (fires after 1), then n2.
  # vol2: always led (quiet). n1's lease runs low at minute 2 (fires at once); n2's never.
  # n3 serves on the failsafe rule for 2 minutes (fires after 1).
  - interval: 1m
    input_series:
      - series: 'blockrep_leader{{job="blockrep",instance="n1",volume="vol1"}}'
        values: '1 1 1 0 0 0 0 0 0'
      - series: 'blockrep_leader{{job="blockrep",instance="n2",volume="vol1"}}'
        values: '0 0 0 0 0 0 1 1 1'
      - series: 'blockrep_leader{{job="blockrep",instance="n3",volume="vol2"}}'
        values: '1x8'
      - series: 'blockrep_lease_remaining_seconds{{job="blockrep",instance="n1",volume="vol1"}}'
        values: '12 12 1 0 0 0 0 0 0'
      - series: 'blockrep_lease_remaining_seconds{{job="blockrep",instance="n2",volume="vol1"}}'
        values: '0 0 0 0 0 0 12 12 12'
      - series: 'blockrep_lease_remaining_seconds{{job="blockrep",instance="n3",volume="vol2"}}'
        values: '12x8'
      - series: 'blockrep_failsafe_active{{job="blockrep",instance="n3",volume="vol2"}}'
        values: '0 0 0 1 1 1 0 0 0'
    alert_rule_test:
      - eval_time: 3m
        alertname: BlockrepNoLeader
        exp_alerts: []
      - eval_time: 5m
        alertname: BlockrepNoLeader
        exp_alerts:
          - exp_labels: {{severity: critical, job: blockrep, volume: vol1}}
      - eval_time: 7m
        alertname: BlockrepNoLeader
        exp_alerts: []
      - eval_time: 1m
        alertname: BlockrepLeaseAboutToExpire
        exp_alerts: []
      - eval_time: 2m
        alertname: BlockrepLeaseAboutToExpire
        exp_alerts:
          - exp_labels: {{severity: warning, job: blockrep, instance: n1, volume: vol1}}
      - eval_time: 4m
        alertname: BlockrepLeaseAboutToExpire
        exp_alerts: []
      - eval_time: 3m
        alertname: BlockrepFailsafeActive
        exp_alerts: []
      - eval_time: 5m
        alertname: BlockrepFailsafeActive
        exp_alerts:
          - exp_labels: {{severity: warning, job: blockrep, instance: n3, volume: vol2}}

  # Flapping: vol1 changes leader every 2 minutes (fires), vol2 once (quiet).
  - interval: 1m
    input_series:
      - series: 'blockrep_failovers_total{{job="blockrep",instance="n1",volume="vol1"}}'
        values: '0 1 1 1 2 2 2 3 3 3'
      - series: 'blockrep_failovers_total{{job="blockrep",instance="n2",volume="vol1"}}'
        values: '0 0 0 1 1 1 2 2 2 3'
      - series: 'blockrep_failovers_total{{job="blockrep",instance="n3",volume="vol2"}}'
        values: '0 1 1 1 1 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 2m
        alertname: BlockrepLeaderFlapping
        exp_alerts: []
      - eval_time: 9m
        alertname: BlockrepLeaderFlapping
        exp_alerts:
          - exp_labels: {{severity: warning, job: blockrep, volume: vol1}}
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
