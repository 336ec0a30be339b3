//! What the nodes log, read as a person reads it: plain text when stderr is not a terminal
//! (journald, a file), and each event once.

mod common;

use std::ffi::OsString;
use std::path::Path;

use common::{
    blockrep_timed, create_store, describe, free_port, run, serve, wait_for_port, Node, Ready, MIB,
};

/// The log file exactly as the node wrote it (`Node::log` strips colour sequences).
fn raw_log(node: &Node) -> String {
    std::fs::read_to_string(&node.log_path).unwrap_or_default()
}

fn assert_plain(text: &str) {
    assert!(
        !text.contains("\x1b["),
        "ANSI escape codes in a log written to a file:\n{text:?}"
    );
}

/// A node left to choose its own colours, as under journald or with `2>file`.
fn started(name: &str, dir: &Path, port: u16, args: Vec<OsString>) -> Node {
    Node::builder(name, dir, port, args)
        .log(dir.with_extension(format!("{name}.log")))
        .ready(Ready::Started)
        .color()
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env("BLOCKREP_LOG", "info")
        .start()
}

#[test]
fn logs_to_a_file_are_plain_text_and_say_each_replica_state_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let args: Vec<OsString> = vec![
        "up".into(),
        "--dir".into(),
        data.clone().into(),
        "--size".into(),
        (64 * MIB).to_string().into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
    ];
    let mut up = started("up", &data, port, args);
    for r in ["replica=r1", "replica=r2"] {
        up.wait_log(0, &[r, "state=\"in_sync\""], 30);
    }
    up.stop_ok();
    let text = raw_log(&up);
    assert_plain(&text);
    for r in ["replica=r1", "replica=r2"] {
        let lines = up.lines_with(0, &[r, "zero gap"]);
        assert_eq!(lines.len(), 1, "{r} joined once, logged so once:\n{text}");
    }
}

#[test]
fn an_unreachable_replica_is_logged_once_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "p", 64 * MIB);
    let nobody = format!("r1=127.0.0.1:{}", free_port());
    let mut p = serve(&store, &["--metrics", "off", "--replica", &nobody]);
    p.stop_ok();
    let text = raw_log(&p);
    assert_plain(&text);
    let lines = p.lines_with(0, &["replica=r1", "state=\"disconnected\""]);
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
    let port = free_port();
    let args: Vec<OsString> = vec![
        "replica".into(),
        mine.clone().into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
        "--metrics".into(),
        "off".into(),
    ];
    let mut replica = started("r1", &mine, port, args);
    wait_for_port(port);
    // A blank store joins the first primary's volume...
    let first = create_store(tmp.path(), "p0", 64 * MIB);
    let r1 = format!("r1=127.0.0.1:{port}");
    let mut p0 = serve(&first, &["--metrics", "off", "--replica", &r1]);
    replica.wait_log(0, &["following primary store"], 30);
    p0.stop_ok();
    // ...and then refuses a primary of another one, which therefore will not serve.
    let other = create_store(tmp.path(), "p", 64 * MIB);
    let out = run(blockrep_timed(60)
        .arg("serve")
        .arg(&other)
        .arg("--nbd")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--metrics")
        .arg("off")
        .arg("--replica")
        .arg(&r1));
    assert!(!out.status.success(), "{}", describe(&out));
    replica.wait_log(0, &["belongs to volume"], 10);
    replica.stop_ok();
    let text = raw_log(&replica);
    assert_plain(&text);
    let lines = replica.lines_with(0, &["belongs to volume"]);
    assert_eq!(lines.len(), 1, "one refusal, logged once:\n{text}");
}
