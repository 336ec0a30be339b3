//! The command line: create, inspect, serve and export as a user runs them, including the
//! error paths (exit codes and one-line messages).

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// Runs a command that is expected to end on its own; kills it (and fails) if it hangs.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if poll_until(limit, || child.try_wait().expect("try_wait")).is_some() {
        return child.wait_with_output().expect("output");
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    panic!(
        "{cmd:?} did not finish within {limit:?}; stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts a failed run: exit code `code`, and stderr is exactly one line (ignoring any log
/// lines from the tracing subscriber) of the form `blockrep: error: ...` containing every
/// string in `needles`. Returns that line.
fn assert_one_line_error(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit code; stdout:\n{}\nstderr:\n{err}",
        stdout(out)
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one error line expected, stderr:\n{err}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("blockrep: error: "),
        "error line format: {line:?}"
    );
    for n in needles {
        assert!(line.contains(n), "error line {line:?} should mention {n:?}");
    }
    line.to_string()
}

fn inspect_json(store: &Path) -> serde_json::Value {
    let out = run_ok(blockrep().arg("inspect").arg(store).arg("--json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect --json output {out:?}: {e}"))
}

/// Starts `blockrep serve` and returns the child with its first stdout line (the one that
/// announces the epoch). The caller stops it.
fn serve_announced(store: &Path, port: u16) -> (Child, String) {
    let mut child = blockrep()
        .arg("serve")
        .arg(store)
        .arg("--nbd")
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let line = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(l) => l,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve printed nothing: {e}");
        }
    };
    wait_for_port(port);
    (child, line)
}

/// The N in "epoch N" of a serve announcement.
fn epoch_of(line: &str) -> u64 {
    let at = line
        .find("epoch ")
        .unwrap_or_else(|| panic!("no epoch in {line:?}"));
    line[at + 6..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no epoch number in {line:?}"))
}

fn sigterm(child: &mut Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_until(Duration::from_secs(60), "serve ignored SIGTERM", || {
        child.try_wait().expect("try_wait")
    });
    assert!(st.success(), "serve exited with {st} after SIGTERM");
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = run_bounded(&mut c, Duration::from_secs(60));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn create_then_inspect_plain_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    let out =
        run_ok(
            blockrep()
                .arg("create")
                .arg(&dir)
                .args(["--size", "48MiB", "--wal-size", "64MiB"]),
        );
    assert!(out.contains("48 MiB"), "create output: {out}");

    let plain = run_ok(blockrep().arg("inspect").arg(&dir));
    for want in [
        "50331648 bytes",
        "block size     4096",
        "epoch          0",
        "checkpoint LSN 0",
        "closed cleanly",
    ] {
        assert!(
            plain.contains(want),
            "inspect should show {want:?}:\n{plain}"
        );
    }

    let j = inspect_json(&dir);
    assert_eq!(j["size"], 48 * MIB, "{j}");
    assert_eq!(j["block_size"], 4096, "{j}");
    assert_eq!(j["epoch"], 0, "{j}");
    assert_eq!(j["checkpoint_lsn"], 0, "{j}");
    assert_eq!(j["clean"], true, "{j}");
    assert_eq!(j["in_use"], false, "{j}");
    assert_eq!(j["wal_capacity"], 64 * MIB, "{j}");
    assert_eq!(j["wal_used"], 0, "{j}");
    assert_eq!(j["wal_entries"], 0, "{j}");
    let id = j["volume_id"].as_str().expect("volume_id").to_string();
    assert!(
        !id.is_empty() && out.contains(&id),
        "create names the volume id"
    );

    // Serve, write, and inspect while it runs: in use, epoch 1.
    let mut srv = serve(&dir, &[]);
    qemu_io(
        &srv.uri(),
        &["write -P 0x42 0 1M", "write -P 0x43 3M 4k", "flush"],
    );
    let live = inspect_json(&dir);
    assert_eq!(live["in_use"], true, "{live}");
    assert_eq!(live["epoch"], 1, "{live}");
    assert_eq!(live["volume_id"], id.as_str());
    let live_plain = run_ok(blockrep().arg("inspect").arg(&dir));
    assert!(
        live_plain.contains("open by another process"),
        "{live_plain}"
    );
    // After a clean stop: the checkpoint covers every write, nothing left in the WAL.
    assert!(srv.terminate().success(), "{}", srv.log());
    let j = inspect_json(&dir);
    assert_eq!(j["epoch"], 1, "{j}");
    assert_eq!(j["clean"], true, "{j}");
    assert_eq!(j["in_use"], false, "{j}");
    let ckpt = j["checkpoint_lsn"].as_u64().expect("checkpoint_lsn");
    assert!(
        ckpt >= 2,
        "two writes were made; checkpoint LSN {ckpt}: {j}"
    );
    assert_eq!(j["head_lsn"].as_u64(), Some(ckpt), "{j}");
    assert_eq!(j["wal_entries"], 0, "{j}");
    assert_eq!(j["size"], 48 * MIB);
    assert_eq!(j["volume_id"], id.as_str());
}

#[test]
fn inspect_reports_an_unclean_store_after_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_store(tmp.path(), "vol", 32 * MIB);
    let mut srv = serve(&dir, &[]);
    qemu_io(&srv.uri(), &["write -P 0x11 0 64k", "write -P 0x12 1M 64k"]);
    srv.kill9();
    let j = inspect_json(&dir);
    assert_eq!(j["clean"], false, "{j}");
    assert_eq!(j["in_use"], false, "{j}");
    assert_eq!(j["epoch"], 1, "{j}");
    let head = j["head_lsn"].as_u64().unwrap();
    let ckpt = j["checkpoint_lsn"].as_u64().unwrap();
    assert!(head >= 2 && head >= ckpt, "{j}");
    assert!(j["wal_entries"].as_u64().unwrap() >= 1, "{j}");
    let plain = run_ok(blockrep().arg("inspect").arg(&dir));
    assert!(plain.contains("not closed cleanly"), "{plain}");
}

#[test]
fn missing_store_is_a_one_line_error_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-store");
    let p = missing.display().to_string();
    let out = run_bounded(
        blockrep().arg("inspect").arg(&missing),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&p]);
    let out = run_bounded(
        blockrep().arg("inspect").arg(&missing).arg("--json"),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&p]);
    let out = run_bounded(
        blockrep()
            .arg("serve")
            .arg(&missing)
            .arg("--nbd")
            .arg(format!("127.0.0.1:{}", free_port())),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&p]);
    let image = tmp.path().join("out.img");
    let out = run_bounded(
        blockrep().arg("export").arg(&missing).arg(&image),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&p]);
    assert!(!missing.exists(), "no command may create the missing store");
    // An existing directory that is not a store is refused the same way.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run_bounded(
        blockrep().arg("inspect").arg(&empty),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&empty.display().to_string()]);
}

#[test]
fn bad_sizes_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vol");
    // Unparseable: a clap usage error, exit 2, naming the bad value.
    let out = run_bounded(
        blockrep().arg("create").arg(&dir).args(["--size", "12abc"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("12abc"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--size"), "{}", stderr(&out));
    assert!(!dir.exists());
    let out = run_bounded(
        blockrep()
            .arg("create")
            .arg(&dir)
            .args(["--size", "64MiB", "--wal-size", "lots"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("lots"), "{}", stderr(&out));
    assert!(!dir.exists());
    // Parseable but not a multiple of 4096, or zero: exit 1, one line, saying why.
    for size in ["1000", "4097", "0"] {
        let out = run_bounded(
            blockrep().arg("create").arg(&dir).args(["--size", size]),
            Duration::from_secs(30),
        );
        assert_one_line_error(&out, 1, &[size, "4096"]);
        assert!(
            !dir.exists(),
            "a refused create must not leave {dir:?} behind"
        );
    }
    // A WAL too small to be useful.
    let out = run_bounded(
        blockrep()
            .arg("create")
            .arg(&dir)
            .args(["--size", "64MiB", "--wal-size", "4KiB"]),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &["WAL"]);
    assert!(!dir.exists());
    // And a good size after all that works.
    run_ok(blockrep().arg("create").arg(&dir).args(["--size", "8MiB"]));
    assert_eq!(inspect_json(&dir)["size"], 8 * MIB);
}

#[test]
fn bad_listen_addresses_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_store(tmp.path(), "vol", 16 * MIB);
    for bad in ["nonsense", "unix:", "127.0.0.1:99999"] {
        let out = run_bounded(
            blockrep().arg("serve").arg(&dir).args(["--nbd", bad]),
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(2), "--nbd {bad}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--nbd"),
            "--nbd {bad}: {}",
            stderr(&out)
        );
    }
    // None of them touched the store.
    assert_eq!(inspect_json(&dir)["epoch"], 0);
}

#[test]
fn port_in_use_is_an_error_naming_the_address() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_store(tmp.path(), "vol", 16 * MIB);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_bounded(
        blockrep().arg("serve").arg(&dir).arg("--nbd").arg(&addr),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&addr]);
    // Same when only the second of two listeners is taken.
    let ok_addr = format!("127.0.0.1:{}", free_port());
    let out = run_bounded(
        blockrep()
            .arg("serve")
            .arg(&dir)
            .args(["--nbd", &ok_addr, "--nbd", &addr]),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&addr]);
    drop(taken);
    // The failed attempts left the store usable and unlocked.
    let srv = serve(&dir, &[]);
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(srv.uri()));
    assert_eq!(size.trim(), (16 * MIB).to_string());
}

#[test]
fn a_unix_socket_a_live_server_answers_on_is_not_stolen() {
    let tmp = tempfile::tempdir().unwrap();
    let a = create_store(tmp.path(), "a", 16 * MIB);
    let b = create_store(tmp.path(), "b", 16 * MIB);
    let sock = tmp.path().join("s.sock");
    let unix = format!("unix:{}", sock.display());
    let srv = serve(&a, &["--nbd", &unix]);
    let out = run_bounded(
        blockrep().arg("serve").arg(&b).args([
            "--nbd",
            &format!("127.0.0.1:{}", free_port()),
            "--nbd",
            &unix,
        ]),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&sock.display().to_string()]);
    // The first server still owns the socket.
    require("nbdinfo");
    let size = run_ok(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbd+unix:///blockrep?socket={}", sock.display())),
    );
    assert_eq!(size.trim(), (16 * MIB).to_string());
    drop(srv);
}

#[test]
fn second_serve_on_a_locked_store_is_refused() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_store(tmp.path(), "vol", 16 * MIB);
    let srv = serve(&dir, &[]);
    qemu_io(&srv.uri(), &["write -P 0x61 0 4k"]);
    let out = run_bounded(
        blockrep()
            .arg("serve")
            .arg(&dir)
            .arg("--nbd")
            .arg(format!("127.0.0.1:{}", free_port())),
        Duration::from_secs(30),
    );
    let line = assert_one_line_error(&out, 1, &[&dir.display().to_string()]);
    assert!(line.contains("in use"), "{line}");
    // Export of a live store is refused too (it would see a stale image).
    let image = tmp.path().join("img");
    let out = run_bounded(
        blockrep().arg("export").arg(&dir).arg(&image),
        Duration::from_secs(30),
    );
    let line = assert_one_line_error(&out, 1, &[&dir.display().to_string()]);
    assert!(line.contains("in use"), "{line}");
    // The refused serve did not disturb the running one, nor bump its epoch.
    qemu_io(&srv.uri(), &["read -P 0x61 0 4k", "write -P 0x62 4k 4k"]);
    assert_eq!(inspect_json(&dir)["epoch"], 1);
}

#[test]
fn create_refuses_an_existing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_store(tmp.path(), "vol", 16 * MIB);
    let before = inspect_json(&dir);
    let out = run_bounded(
        blockrep().arg("create").arg(&dir).args(["--size", "32MiB"]),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&dir.display().to_string(), "exists"]);
    let after = inspect_json(&dir);
    assert_eq!(before, after, "the existing store must be untouched");

    // A directory with someone else's files in it.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("precious.txt"), b"keep me").unwrap();
    let out = run_bounded(
        blockrep()
            .arg("create")
            .arg(&other)
            .args(["--size", "16MiB"]),
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, &[&other.display().to_string()]);
    let names: Vec<_> = std::fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("precious.txt")]);
    assert_eq!(
        std::fs::read(other.join("precious.txt")).unwrap(),
        b"keep me"
    );

    // A regular file in the way.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = run_bounded(
        blockrep()
            .arg("create")
            .arg(&file)
            .args(["--size", "16MiB"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

/// Writes through NBD (nbdcopy and qemu-io), returns the image the volume must now hold.
fn write_known_image(uri: &str, size: u64, dir: &Path) -> Vec<u8> {
    require("nbdcopy");
    require("qemu-io");
    let mut expect = vec![0u8; size as usize];
    // 8 MiB of random data at offset 0 with nbdcopy.
    let head = random_bytes(0xE4, 8 << 20);
    let src = dir.join("head.img");
    std::fs::write(&src, &head).unwrap();
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&src).arg(uri));
    expect[..head.len()].copy_from_slice(&head);
    // Unaligned patterns, zeroes and a discard with qemu-io.
    qemu_io(
        uri,
        &[
            "write -P 0xab 20001000 70000",
            "write -P 0xcd 33554431 4099",
            "write -z 1000000 5000",
            "discard 2097152 1048576",
            "write -f -P 0x5a 67104000 4096",
            "flush",
        ],
    );
    expect[20001000..20071000].fill(0xab);
    expect[33554431..33558530].fill(0xcd);
    expect[1000000..1005000].fill(0);
    expect[2097152..3145728].fill(0);
    expect[67104000..67108096].fill(0x5a);
    // Sanity: the live volume holds that image (read back with nbdcopy).
    let live = dir.join("live.img");
    run_ok(Command::new("nbdcopy").arg(uri).arg(&live));
    assert!(
        std::fs::read(&live).unwrap() == expect,
        "the live volume does not hold what was written"
    );
    expect
}

fn assert_export_equals(store: &Path, image: &Path, expect: &[u8]) {
    let out = run_ok(blockrep().arg("export").arg(store).arg(image));
    assert!(out.contains("exported"), "{out}");
    let got = std::fs::read(image).unwrap();
    assert_eq!(got.len(), expect.len(), "exported image size");
    if let Some(at) = first_difference(&got, expect) {
        panic!(
            "exported image differs from what was written over NBD at byte {at} \
             (got {:#x}, want {:#x})",
            got[at], expect[at]
        );
    }
}

#[test]
fn export_after_sigterm_equals_what_was_written_over_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64 * MIB + 8192;
    let dir = create_store(tmp.path(), "vol", size);
    let mut srv = serve(&dir, &[]);
    let expect = write_known_image(&srv.uri(), size, tmp.path());
    assert!(srv.terminate().success(), "{}", srv.log());
    assert_export_equals(&dir, &tmp.path().join("export.img"), &expect);
    // Export is read-only: the store still serves the same data afterwards.
    let srv = serve(&dir, &[]);
    let again = tmp.path().join("again.img");
    run_ok(Command::new("nbdcopy").arg(srv.uri()).arg(&again));
    assert!(std::fs::read(&again).unwrap() == expect);
}

#[test]
fn export_after_kill_9_replays_the_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64 * MIB + 8192;
    let dir = create_store(tmp.path(), "vol", size);
    let mut srv = serve(&dir, &[]);
    let expect = write_known_image(&srv.uri(), size, tmp.path());
    srv.kill9();
    assert_export_equals(&dir, &tmp.path().join("export.img"), &expect);
    // A second export gives the same bytes (the first replay did not damage anything).
    assert_export_equals(&dir, &tmp.path().join("export2.img"), &expect);
}

#[test]
fn serve_prints_an_epoch_that_increases_by_one_on_each_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_store(tmp.path(), "vol", 16 * MIB);
    assert_eq!(inspect_json(&dir)["epoch"], 0);
    let mut seen = Vec::new();
    for round in 0..4 {
        let port = free_port();
        let (mut child, line) = serve_announced(&dir, port);
        assert!(line.contains("serving"), "{line}");
        assert!(
            line.contains(&format!("127.0.0.1:{port}")),
            "the announcement names the address: {line}"
        );
        seen.push(epoch_of(&line));
        // From the announcement on, SIGTERM is a clean stop (its own test below).
        if round == 1 {
            // A crash must not reuse the epoch either.
            let _ = child.kill();
            let _ = child.wait();
        } else {
            sigterm(&mut child);
        }
        assert_eq!(
            inspect_json(&dir)["epoch"].as_u64(),
            seen.last().copied(),
            "the stored epoch is the one served"
        );
    }
    assert_eq!(
        seen,
        vec![1, 2, 3, 4],
        "epochs announced by successive serves"
    );
}

#[test]
fn a_stale_unix_socket_from_a_killed_server_is_replaced() {
    require("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_store(tmp.path(), "vol", 16 * MIB);
    let sock = tmp.path().join("s.sock");
    let unix = format!("unix:{}", sock.display());
    let uri = format!("nbd+unix:///blockrep?socket={}", sock.display());
    let mut srv = serve(&dir, &["--nbd", &unix]);
    run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    srv.kill9();
    assert!(sock.exists(), "kill -9 leaves the socket file behind");
    let mut srv = serve(&dir, &["--nbd", &unix]);
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(size.trim(), (16 * MIB).to_string());
    // A clean stop removes the socket file.
    assert!(srv.terminate().success());
    assert!(!sock.exists(), "SIGTERM should remove {}", sock.display());
}

#[test]
fn a_unix_listener_never_deletes_a_regular_file_in_its_way() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_store(tmp.path(), "vol", 16 * MIB);
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, b"precious").unwrap();
    let mut child = blockrep()
        .arg("serve")
        .arg(&dir)
        .args(["--nbd", &format!("127.0.0.1:{}", free_port())])
        .arg("--nbd")
        .arg(format!("unix:{}", file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It should refuse at once; give it a few seconds, then stop it either way.
    let exited = poll_until(Duration::from_secs(5), || {
        child.try_wait().expect("try_wait")
    })
    .is_some();
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let content = std::fs::read(&file).ok();
    assert_eq!(
        content.as_deref(),
        Some(&b"precious"[..]),
        "`serve --nbd unix:{}` deleted (or replaced) the regular file that was there",
        file.display()
    );
    assert!(
        exited,
        "serve kept running on a path that is a regular file"
    );
    assert_eq!(status.code(), Some(1));
}

#[test]
fn sigterm_right_after_the_serving_line_is_a_clean_stop() {
    // Supervisors (and scripts) send SIGTERM as soon as the server says it is serving. The
    // server already accepts connections at that point, so SIGTERM must already mean "stop
    // cleanly": exit 0 and a store marked clean, not death by the default signal action.
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_store(tmp.path(), "vol", 16 * MIB);
    let mut outcomes = Vec::new();
    for _ in 0..12 {
        let (mut child, line) = serve_announced(&dir, free_port());
        assert!(line.contains("serving"), "{line}");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = child.wait().unwrap();
        let clean = inspect_json(&dir)["clean"] == true;
        outcomes.push((st.to_string(), clean));
    }
    assert!(
        outcomes
            .iter()
            .all(|(st, clean)| st == "exit status: 0" && *clean),
        "SIGTERM right after \"serving\" did not always stop the server cleanly: {outcomes:?}"
    );
}

#[test]
fn metrics_off_serves_no_admin_endpoint_and_the_volume_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "vol", 64 << 20);
    let mut s = serve(&store, &["--metrics", "off"]);
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &s.uri(),
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The only socket the server listens on is its NBD port.
    let pid = s.pid();
    let listening = run_ok(Command::new("ss").args(["-Hltnp"]));
    let ours: Vec<&str> = listening
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .collect();
    assert_eq!(ours.len(), 1, "listening sockets of the server: {ours:?}");
    assert!(ours[0].contains(&format!(":{}", s.port)), "{ours:?}");
    assert!(s.terminate().success(), "{}", s.log());
}
