//! The systemd side, end to end: `systemd-analyze verify` on the units in `systemd/`, and
//! the sd_notify protocol (READY=1, STOPPING=1, WATCHDOG=1) as the units use it, spoken by
//! `blockrep serve` and `blockrep replica` started with the units' ExecStart= lines.
//!
//! Every tool is required, never skipped (`scripts/test` installs them). Every child process
//! is killed when its guard drops and also (PR_SET_PDEATHSIG) when the test thread that
//! started it ends; every wait has a deadline.

mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::http_get;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_blockrep");
const VOLUME: &str = "vol1";

fn require_tools(tools: &[&str]) {
    for t in tools {
        require(t);
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
        "blockrep-node@.service",
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
    for (unit, exec) in [
        (
            "blockrep-primary@.service",
            "blockrep serve --config /etc/blockrep/%i.toml",
        ),
        (
            "blockrep-replica@.service",
            "blockrep replica --config /etc/blockrep/%i.toml",
        ),
        (
            "blockrep-node@.service",
            "blockrep node /var/lib/blockrep/%i $BLOCKREP_NODE_ARGS",
        ),
    ] {
        let t = get(unit);
        for line in [
            format!("ExecStart=/usr/local/bin/{exec}"),
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

    /// Receives until `n` datagrams containing `needle` have arrived from now on; returns how
    /// long that took, or None if `secs` pass first.
    fn wait_count(&mut self, needle: &str, n: usize, secs: f64) -> Option<Duration> {
        let from = Instant::now();
        let deadline = from + Duration::from_secs_f64(secs);
        let mut seen = 0;
        while seen < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.wait_for(needle, left.as_secs_f64()).is_none() {
                return None;
            }
            seen += 1;
        }
        Some(from.elapsed())
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

/// `argv` with NOTIFY_SOCKET=`notify` (and `env`), its output in `log`; nothing is awaited
/// here (READY=1 on the socket is what the test waits for).
fn spawn_notified(
    name: &str,
    argv: &[String],
    notify: &Path,
    env: &[(&str, &str)],
    log: &Path,
) -> Node {
    let mut b = Node::builder(name, log, 0, argv[1..].iter().map(Into::into).collect())
        .bin(Path::new(&argv[0]))
        .log(log.to_path_buf())
        .ready(Ready::Started)
        .env("NOTIFY_SOCKET", &notify.display().to_string())
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start()
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
        .unwrap_or_else(|| panic!("no READY=1 from serve; log:\n{}", p.log()));
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
        p.log()
    );
    let st = p.stop();
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
    let st = wait_until(
        Duration::from_secs(60),
        "serve with its port taken to exit",
        || p2.child.as_mut().unwrap().try_wait().unwrap(),
    );
    p2.child = None;
    assert_eq!(st.code(), Some(1), "port taken: {st}; log:\n{}", p2.log());
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
        .unwrap_or_else(|| panic!("no READY=1; log:\n{}", p3.log()));
    // Half the watchdog interval is ~100 ms: 8 pings in at most 1.5 s, and not faster
    // than 30 in 1.5 s (so 8 take at least 0.4 s).
    let took = n3.wait_count("WATCHDOG=1", 8, 1.5);
    assert!(
        took.is_some_and(|t| t >= Duration::from_millis(400)),
        "WATCHDOG=1 every ~100 ms (WATCHDOG_USEC=200000): 8 pings took {took:?}; got {:?}",
        n3.got
    );
    p3.stop_ok();

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
        .unwrap_or_else(|| panic!("no READY=1; log:\n{}", p4.log()));
    assert!(
        n4.wait_for("WATCHDOG=1", 1.0).is_none(),
        "pings for another pid's watchdog"
    );
    p4.stop_ok();

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
        .unwrap_or_else(|| panic!("no READY=1 from replica; log:\n{}", r.log()));
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
        r.log()
    );
    let st = r.stop();
    assert!(st.success(), "replica after SIGTERM: {st}");
}
