//! NBD protocol conformance of a real `blockrep serve`, checked by the project's own libnbd
//! client (tests/clients/nbd_conformance.py, through python3-libnbd): handshake paths, block
//! sizes and flags, structured reads, BLOCK_STATUS, pipelining, error codes and multi-conn.
//! The script prints one TAP line per check; this test fails on any `not ok`, on a crash, and
//! if fewer checks ran than the script has, so a check that silently stops running is caught.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/clients/nbd_conformance.py"
);

/// How many checks tests/clients/nbd_conformance.py defines; raise it when adding one.
const CHECKS: usize = 28;

/// What the script printed, sorted by line kind.
struct Tap {
    passed: Vec<String>,
    failed: Vec<String>,
    plan: Option<usize>,
}

impl Tap {
    fn parse(out: &str) -> Tap {
        let mut tap = Tap {
            passed: Vec::new(),
            failed: Vec::new(),
            plan: None,
        };
        for line in out.lines() {
            if line.starts_with("ok ") {
                tap.passed.push(line.to_string());
            } else if line.starts_with("not ok ") {
                tap.failed.push(line.to_string());
            } else if let Some(n) = line.strip_prefix("1..") {
                tap.plan = n.trim().parse().ok();
            }
        }
        tap
    }
}

fn require_libnbd_binding() {
    assert!(
        Path::new(SYSTEM_PYTHON).exists(),
        "{SYSTEM_PYTHON} is not installed; run ./scripts/test"
    );
    let out = run(Command::new(SYSTEM_PYTHON).args(["-c", "import nbd"]));
    assert!(
        out.status.success(),
        "the libnbd Python binding (python3-libnbd) is missing; run ./scripts/test\n{}",
        describe(&out)
    );
}

#[test]
fn libnbd_conformance_checks_all_pass() {
    require_libnbd_binding();
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = create_store(tmp.path(), "vol", 128 * MIB);
    let mut srv = serve(&store, &[]);
    let out = run(timed(300, SYSTEM_PYTHON).arg(SCRIPT).arg(srv.uri()));
    let stdout = text(&out.stdout);
    println!("{stdout}");
    let tap = Tap::parse(&stdout);
    assert!(
        tap.failed.is_empty(),
        "failing conformance checks:\n{}\n\nfull run:\n{}\nserver log:\n{}",
        tap.failed.join("\n"),
        describe(&out),
        srv.log()
    );
    assert!(
        out.status.success(),
        "the conformance script failed:\n{}\nserver log:\n{}",
        describe(&out),
        srv.log()
    );
    assert_eq!(
        tap.plan,
        Some(tap.passed.len()),
        "the plan line does not match the checks that ran:\n{}",
        describe(&out)
    );
    assert!(
        tap.passed.len() >= CHECKS,
        "only {} of {CHECKS} checks ran:\n{}",
        tap.passed.len(),
        describe(&out)
    );
    assert!(
        srv.running(),
        "blockrep serve exited during the checks; its log:\n{}",
        srv.log()
    );
}
