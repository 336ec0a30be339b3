//! The admin endpoint's one state-changing request, `PUT /v1/replicas/NAME/address`, against
//! real `blockrep serve` and `blockrep replica` processes: disabled without
//! `--admin-token-file`, 401 without credentials, 403 for a wrong token, and with the right one
//! the primary reconnects the replica where it now lives; `blockrep set-address` with and
//! without the token file; the start-up warning of a port other hosts reach without TLS.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::admin::{agent, launch_admin, AdminNode};
use common::*;

const TOKEN: &str = "admin-auth-test-token-0123456789";

fn token_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("token file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

/// `blockrep serve` (`--nbd`) or `replica` (`--listen`) on `host`, its port and admin endpoint
/// on free ports, with `extra` flags.
fn start(cmd: &str, store: &Path, name: &str, host: &str, extra: &[String]) -> Node {
    let (port, metrics) = (free_port(), free_port());
    let listen = if cmd == "serve" { "--nbd" } else { "--listen" };
    let mut args = vec![
        cmd.to_string(),
        store.display().to_string(),
        listen.into(),
        format!("{host}:{port}"),
        "--metrics".into(),
        format!("{host}:{metrics}"),
    ];
    args.extend_from_slice(extra);
    launch_admin(name, store, port, metrics, args)
}

fn start_replica(store: &Path, name: &str) -> Node {
    start("replica", store, name, "127.0.0.1", &[])
}

/// A primary replicating to `replica` (as r1), with `extra` flags, once r1 is in sync.
fn start_primary(store: &Path, replica: &Node, extra: &[&str]) -> Node {
    let mut args = vec!["--replica".to_string(), format!("r1={}", replica.addr())];
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = start("serve", store, "p", "127.0.0.1", &args);
    p.wait_replica_state("r1", "in_sync", 60);
    p
}

/// PUT the address of r1 with `auth` as the Authorization header: (status, WWW-Authenticate,
/// body).
fn put_address(p: &Node, addr: &str, auth: Option<&str>) -> (u16, Option<String>, String) {
    let url = format!("http://{}/v1/replicas/r1/address", p.metrics_addr());
    let mut req = agent().put(&url);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let mut resp = req.send(addr).expect("the admin endpoint answers");
    let www = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.body_mut().read_to_string().expect("body");
    (resp.status().as_u16(), www, body)
}

fn r1_address(p: &Node) -> String {
    let st = p.status();
    let r1 = st["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .find(|r| r["name"] == "r1")
        .cloned()
        .unwrap_or_else(|| panic!("no r1 in {st:#}"));
    r1["address"].as_str().unwrap_or_default().to_string()
}

fn set_address_cli(p: &Node, addr: &str, token: Option<&Path>) -> std::process::Output {
    let mut cmd = blockrep_timed(30);
    cmd.arg("set-address")
        .arg(format!("r1={addr}"))
        .arg("--admin")
        .arg(p.metrics_addr());
    if let Some(t) = token {
        cmd.arg("--admin-token-file").arg(t);
    }
    run(&mut cmd)
}

#[test]
fn without_a_token_file_the_put_is_disabled_and_the_address_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = start_replica(&create_store(dir, "r1", 16 * MIB), "r1");
    let p = start_primary(&create_store(dir, "p", 16 * MIB), &r, &[]);
    let before = r1_address(&p);
    assert_eq!(before, r.addr());

    let bearer = format!("Bearer {TOKEN}");
    for auth in [None, Some(bearer.as_str())] {
        let (status, _, body) = put_address(&p, "127.0.0.1:1", auth);
        assert_eq!(status, 403, "{auth:?}: {body}");
        assert!(body.contains("--admin-token-file"), "{body}");
    }
    let out = set_address_cli(&p, "127.0.0.1:1", None);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        err.contains("forbidden") && err.contains("disabled") && err.contains("--admin-token-file"),
        "{err}"
    );
    assert_eq!(r1_address(&p), before, "a refused PUT changes nothing");
    assert_eq!(p.replica_state("r1"), "in_sync");
}

#[test]
fn with_a_token_file_only_the_right_token_moves_a_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let token = token_file(dir, "admin.token", &format!("{TOKEN}\n"), 0o600);
    let wrong = token_file(dir, "wrong.token", "some-other-token-0123456789\n", 0o600);
    let mut r = start_replica(&create_store(dir, "r1", 16 * MIB), "r1");
    let token_arg = token.to_str().expect("UTF-8 path");
    let p = start_primary(
        &create_store(dir, "p", 16 * MIB),
        &r,
        &["--admin-token-file", token_arg],
    );
    let old = r.addr();

    // r1 moves: it restarts on another port, which the primary does not know.
    r.stop_ok();
    p.wait_replica_state("r1", "disconnected", 30);
    r.set_listen_port(free_port());
    r.restart();
    let new = r.addr();

    let (status, www, body) = put_address(&p, &new, None);
    assert_eq!(status, 401, "{body}");
    let www = www.expect("a 401 says how to authenticate");
    assert!(www.starts_with("Bearer"), "{www}");
    let (status, _, body) = put_address(&p, &new, Some("Bearer not-the-right-token-at-all"));
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = put_address(&p, &new, Some("Basic YWRtaW46YWRtaW4="));
    assert_eq!(status, 401, "{body}");

    let out = set_address_cli(&p, &new, None);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        err.contains("unauthorised: ") && err.contains("pass --admin-token-file"),
        "{err}"
    );
    let out = set_address_cli(&p, &new, Some(&wrong));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        err.contains("forbidden") && err.contains("wrong.token"),
        "{err}"
    );
    assert_eq!(r1_address(&p), old, "no refused request moved r1");
    assert_ne!(p.replica_state("r1"), "in_sync");

    // The raw request with the right token, then the command line.
    let (status, _, body) = put_address(&p, &new, Some(&format!("Bearer {TOKEN}")));
    assert_eq!(status, 200, "{body}");
    p.wait_replica_state("r1", "in_sync", 60);
    assert_eq!(r1_address(&p), new);
    let out = set_address_cli(&p, &new, Some(&token));
    assert!(out.status.success(), "{}", describe(&out));
    assert!(text(&out.stdout).contains(&format!("r1 is now at {new}")));
    assert_eq!(r1_address(&p), new);
}

#[test]
fn a_bad_token_file_refuses_the_start_and_a_loose_one_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = create_store(dir, "p", 16 * MIB);
    for (name, contents, says) in [
        ("short.token", "0123456789\n", "at least 16"),
        ("empty.token", " \n", "empty"),
        ("spaced.token", "0123456789 abcdef012\n", "printable ASCII"),
    ] {
        let f = token_file(dir, name, contents, 0o600);
        let out = run(blockrep_timed(30)
            .arg("serve")
            .arg(&store)
            .args(["--nbd", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .arg("--admin-token-file")
            .arg(&f));
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{name}: {}", describe(&out));
        assert!(
            err.contains("--admin-token-file") && err.contains(name) && err.contains(says),
            "{name}: {err}"
        );
    }
    let missing = dir.join("missing.token");
    let out = run(blockrep_timed(30)
        .arg("serve")
        .arg(&store)
        .args(["--nbd", "127.0.0.1:0"])
        .arg("--admin-token-file")
        .arg(&missing));
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(text(&out.stderr).contains("missing.token"));

    let loose = token_file(dir, "loose.token", TOKEN, 0o644);
    let flag = [
        "--admin-token-file".to_string(),
        loose.display().to_string(),
    ];
    let p = start("serve", &store, "loose", "127.0.0.1", &flag);
    let warned = p.lines_with(0, &["loose.token", "readable by group or others"]);
    assert_eq!(warned.len(), 1, "{}", p.log());
    assert!(warned[0].contains("chmod 600"), "{}", warned[0]);
}

#[test]
fn a_port_other_hosts_reach_without_tls_warns_once_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = create_store(dir, "p", 16 * MIB);

    let mut open = start("serve", &store, "open", "0.0.0.0", &[]);
    let nbd = open.lines_with(0, &["exposed: NBD on 0.0.0.0:"]);
    assert_eq!(nbd.len(), 1, "{}", open.log());
    assert!(
        nbd[0].contains("WARN") && nbd[0].contains("--tls require"),
        "{}",
        nbd[0]
    );
    let admin = open.lines_with(0, &["exposed: the admin endpoint on 0.0.0.0:"]);
    assert_eq!(admin.len(), 1, "{}", open.log());
    assert!(
        admin[0].contains("--metrics") && admin[0].contains("PUT (set-address) is disabled"),
        "{}",
        admin[0]
    );
    open.stop_ok();

    let local = start("serve", &store, "local", "127.0.0.1", &[]);
    assert!(
        local.lines_with(0, &["exposed:"]).is_empty(),
        "{}",
        local.log()
    );
}
