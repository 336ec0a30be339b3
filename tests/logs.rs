//! What the nodes log, read as a person reads it: plain text when stderr is not a terminal
//! (journald, a file), and each event once.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    blockrep, blockrep_timed, create_store, describe, die_with_test, free_port, run, serve,
    wait_for_port, KillOnDrop, MIB,
};

/// Waits until `log` holds a line with every one of `needles`, for at most `secs`.
fn wait_for_line(log: &Path, needles: &[&str], secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {needles:?} within {secs}s; the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of `text` holding every one of `needles`.
fn lines_with<'a>(text: &'a str, needles: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

fn sigterm(child: &std::process::Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

#[test]
fn logs_to_a_file_are_plain_text_and_say_each_replica_state_once() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("up.log");
    let mut cmd = blockrep();
    cmd.arg("up")
        .arg("--dir")
        .arg(tmp.path().join("data"))
        .arg("--size")
        .arg((64 * MIB).to_string())
        .arg("--nbd")
        .arg(format!("127.0.0.1:{}", free_port()))
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env("BLOCKREP_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    die_with_test(&mut cmd);
    let mut up = KillOnDrop {
        child: cmd.spawn().expect("spawn blockrep up"),
        what: "blockrep up".into(),
        stderr: Some(log.clone()),
    };
    for r in ["replica=r1", "replica=r2"] {
        wait_for_line(&log, &[r, "state=\"in_sync\""], 30);
    }
    sigterm(&up.child);
    let status = up.wait(60);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "blockrep up failed ({status}):\n{text}");
    assert!(
        !text.contains("\x1b["),
        "ANSI escape codes in a log written to a file:\n{text:?}"
    );
    for r in ["replica=r1", "replica=r2"] {
        let lines = lines_with(&text, &[r, "zero gap"]);
        assert_eq!(lines.len(), 1, "{r} joined once, logged so once:\n{text}");
    }
}

#[test]
fn an_unreachable_replica_is_logged_once_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "p", 64 * MIB);
    let nobody = format!("r1=127.0.0.1:{}", free_port());
    let mut p = serve(&store, &["--metrics", "off", "--replica", &nobody]);
    let status = p.terminate();
    let text = p.log();
    assert!(
        status.success(),
        "blockrep serve failed ({status}):\n{text}"
    );
    assert!(!text.contains("\x1b["), "ANSI escape codes:\n{text:?}");
    let lines = lines_with(&text, &["replica=r1", "state=\"disconnected\""]);
    assert_eq!(
        lines.len(),
        1,
        "a replica nobody answers for is reported once, not per retry nor again at start:\n{text}"
    );
}

#[test]
fn a_replica_logs_a_refused_primary_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mine = create_store(tmp.path(), "r1", 64 * MIB);
    let other = create_store(tmp.path(), "p", 64 * MIB);
    let port = free_port();
    let log = tmp.path().join("r1.log");
    let mut cmd = blockrep();
    cmd.arg("replica")
        .arg(&mine)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics")
        .arg("off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    die_with_test(&mut cmd);
    let mut replica = KillOnDrop {
        child: cmd.spawn().expect("spawn blockrep replica"),
        what: "blockrep replica".into(),
        stderr: Some(log.clone()),
    };
    wait_for_port(port);
    // A blank store joins the first primary's volume...
    let first = create_store(tmp.path(), "p0", 64 * MIB);
    let r1 = format!("r1=127.0.0.1:{port}");
    let mut p0 = serve(&first, &["--metrics", "off", "--replica", &r1]);
    wait_for_line(&log, &["following primary store"], 30);
    assert!(p0.terminate().success(), "{}", p0.log());
    // ...and then refuses a primary of another one, which therefore will not serve.
    let out = run(blockrep_timed(60)
        .arg("serve")
        .arg(&other)
        .arg("--nbd")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--metrics")
        .arg("off")
        .arg("--replica")
        .arg(format!("r1=127.0.0.1:{port}")));
    assert!(!out.status.success(), "{}", describe(&out));
    wait_for_line(&log, &["belongs to volume"], 10);
    sigterm(&replica.child);
    let status = replica.wait(60);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "blockrep replica failed ({status}):\n{text}"
    );
    let lines = lines_with(&text, &["belongs to volume"]);
    assert_eq!(lines.len(), 1, "one refusal, logged once:\n{text}");
}
