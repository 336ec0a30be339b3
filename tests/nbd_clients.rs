//! Real third-party NBD clients (libnbd tools, qemu, fio, nbdfuse) against a real
//! `blockrep serve`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// Runs a client with a time limit (a hung client fails the test instead of wedging it).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    wait_bounded(child, limit, &format!("{cmd:?}"))
}

fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
    // Drain the pipes in the background so a chatty child cannot block on them.
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out_pipe, &mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err_pipe, &mut v);
        v
    });
    let Some(status) = poll_until(limit, || child.try_wait().expect("try_wait")) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not finish within {limit:?}");
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok_bounded(cmd: &mut Command, limit: Duration) -> String {
    let out = run_bounded(cmd, limit);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const T: Duration = Duration::from_secs(60);

/// qemu-io with `-f raw` on a URI (or `--image-opts` when `opts` is true); every command must
/// succeed.
fn qemu_io_ok(target: &str, extra: &[&str], cmds: &[String]) -> String {
    let out = qemu_io(target, extra, cmds);
    let t = text(&out);
    assert!(
        out.status.success() && !t.contains("failed") && !t.contains("rror"),
        "qemu-io {extra:?} {target} {cmds:?} failed ({}):\n{t}",
        out.status
    );
    t
}

fn qemu_io(target: &str, extra: &[&str], cmds: &[String]) -> Output {
    require("qemu-io");
    let mut c = Command::new("qemu-io");
    if target.starts_with("driver=") {
        c.arg("--image-opts");
    } else {
        c.args(["-f", "raw"]);
    }
    c.args(extra).arg(target);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    run_bounded(&mut c, T)
}

/// nbdsh (libnbd's Python shell) with the system Python, which has the `nbd` module.
fn nbdsh(uri: &str, code: &str) -> String {
    require("nbdsh");
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    ok_bounded(
        Command::new("nbdsh")
            .env("PATH", path)
            .arg("-u")
            .arg(uri)
            .arg("-c")
            .arg(code),
        T,
    )
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    require("nbdinfo");
    let out = ok_bounded(Command::new("nbdinfo").arg("--json").arg(uri), T);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json {uri}: {e}\n{out}"))
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// The first index where two buffers differ.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() == b.len() {
            None
        } else {
            Some(a.len().min(b.len()))
        })
}

// ---------------------------------------------------------------------------------------------

#[test]
fn nbdinfo_reports_size_flags_and_block_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 100 * MIB + 12 * 1024;
    let store = create_store(tmp.path(), "vol", size);
    let srv = serve(&store, &[]);
    for (uri, name) in [
        (srv.uri(), ""),
        (format!("{}blockrep", srv.uri()), "blockrep"),
    ] {
        let j = nbdinfo_json(&uri);
        assert_eq!(j["protocol"], "newstyle-fixed", "{j}");
        assert_eq!(j["structured"], true, "{j}");
        let e = &j["exports"][0];
        assert_eq!(e["export-name"], name, "{e}");
        assert_eq!(e["export-size"], size, "{e}");
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_multi_conn",
            "can_cache",
            "can_df",
        ] {
            assert_eq!(e[flag], true, "{flag} must be true: {e}");
        }
        assert_eq!(e["is_read_only"], false, "{e}");
        assert_eq!(e["block_size_minimum"], 1, "{e}");
        assert_eq!(e["block_size_preferred"], 4096, "{e}");
        assert_eq!(e["block_size_maximum"], 33_554_432, "{e}");
        let contexts: Vec<&str> = e["contexts"]
            .as_array()
            .expect("contexts")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(contexts.contains(&"base:allocation"), "{e}");
    }
    // Plain output and --size agree.
    let sz = ok_bounded(Command::new("nbdinfo").arg("--size").arg(srv.uri()), T);
    assert_eq!(sz.trim(), size.to_string());
    // --list shows the export by name.
    let list = ok_bounded(Command::new("nbdinfo").arg("--list").arg(srv.uri()), T);
    assert!(list.contains("export=\"blockrep\""), "{list}");
    // An unknown export name is an error.
    let out = run_bounded(
        Command::new("nbdinfo").arg(format!("{}no-such-export", srv.uri())),
        T,
    );
    assert!(
        !out.status.success(),
        "nbdinfo on an unknown export succeeded"
    );

    // A server with a custom export name serves that name and the empty name, nothing else.
    let store2 = create_store(tmp.path(), "vol2", 8 * MIB);
    let srv2 = serve(&store2, &["--export", "data1"]);
    let j = nbdinfo_json(&format!("{}data1", srv2.uri()));
    assert_eq!(j["exports"][0]["export-size"], 8 * MIB);
    let j = nbdinfo_json(&srv2.uri());
    assert_eq!(j["exports"][0]["export-size"], 8 * MIB);
    let out = run_bounded(
        Command::new("nbdinfo").arg(format!("{}blockrep", srv2.uri())),
        T,
    );
    assert!(
        !out.status.success(),
        "the default name must not exist here"
    );
}

/// The qemu-io session for one cache mode, in the region starting at `b`.
fn qemu_io_session(uri: &str, extra: &[&str], b: u64, size: u64) {
    let c = |s: String| s;
    let writes = vec![
        c(format!("write -P 0xab {} 70000", b + 1000)),
        c(format!("read -P 0xab {} 70000", b + 1000)),
        c(format!("read -P 0 {b} 1000")),
        c(format!("read -P 0 {} 4096", b + 71000)),
        // Partial WRITE_ZEROES inside the pattern, unaligned at both ends.
        c(format!("write -z {} 3000", b + 5000)),
        c(format!("read -P 0 {} 3000", b + 5000)),
        c(format!("read -P 0xab {} 4000", b + 1000)),
        c(format!("read -P 0xab {} 63000", b + 8000)),
        // A TRIM of whole blocks inside a pattern.
        c(format!("write -P 0x77 {} 300000", b + 200000)),
        c(format!("discard {} 131072", b + 262144)),
        c(format!("read -P 0x77 {} 62144", b + 200000)),
        c(format!("read -P 0 {} 131072", b + 262144)),
        c(format!("read -P 0x77 {} 106784", b + 393216)),
        // WRITE_ZEROES that may trim (NO_HOLE clear).
        c(format!("write -z -u {} 8192", b + 409600)),
        c(format!("read -P 0 {} 8192", b + 409600)),
        c(format!("read -P 0x77 {} 1", b + 417792)),
        // FUA write, then an explicit flush.
        c(format!("write -f -P 0x11 {} 5001", b + 600001)),
        c(format!("read -P 0x11 {} 5001", b + 600001)),
        c("flush".to_string()),
        // Tiny writes, including the very last bytes of the volume.
        c(format!("write -P 0x22 {} 1", b + 700000)),
        c(format!("read -P 0x22 {} 1", b + 700000)),
        c(format!("write -P 0x33 {} 3", size - 3)),
        c(format!("read -P 0x33 {} 3", size - 3)),
        c("flush".to_string()),
    ];
    qemu_io_ok(uri, extra, &writes);
}

/// Reads back, in a fresh qemu-io process, what `qemu_io_session` left at `b`.
fn qemu_io_verify(uri: &str, b: u64, size: u64) {
    let reads = vec![
        format!("read -P 0 {b} 1000"),
        format!("read -P 0xab {} 4000", b + 1000),
        format!("read -P 0 {} 3000", b + 5000),
        format!("read -P 0xab {} 63000", b + 8000),
        format!("read -P 0 {} 129000", b + 71000),
        format!("read -P 0x77 {} 62144", b + 200000),
        format!("read -P 0 {} 131072", b + 262144),
        format!("read -P 0x77 {} 16384", b + 393216),
        format!("read -P 0 {} 8192", b + 409600),
        format!("read -P 0x77 {} 82208", b + 417792),
        format!("read -P 0x11 {} 5001", b + 600001),
        format!("read -P 0x22 {} 1", b + 700000),
        format!("read -P 0x33 {} 3", size - 3),
    ];
    qemu_io_ok(uri, &[], &reads);
}

#[test]
fn qemu_io_unaligned_patterns_zeroes_discard_fua_and_flush() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let store = create_store(tmp.path(), "vol", size);
    let mut srv = serve(&store, &[]);
    let wb = 16 * MIB;
    // Default cache mode (writethrough: every write FUA), then writeback.
    qemu_io_session(&srv.uri(), &[], 0, size);
    qemu_io_session(&srv.uri(), &["-t", "writeback"], wb, size);
    qemu_io_verify(&srv.uri(), 0, size);
    qemu_io_verify(&srv.uri(), wb, size);

    // A wrong pattern, or a read one byte too long, must fail (so the reads above mean
    // something).
    for cmd in [
        "read -P 0xac 1000 70000".to_string(),
        "read -P 0xab 1000 70001".to_string(),
        format!("read -P 0 {} 1", wb + 1000),
        format!("read -P 0x33 {} 4", size - 4),
    ] {
        let out = qemu_io(&srv.uri(), &[], std::slice::from_ref(&cmd));
        assert!(!out.status.success(), "qemu-io {cmd:?} should have failed");
        assert!(
            text(&out).contains("Pattern verification failed"),
            "{cmd}: {}",
            text(&out)
        );
    }

    // Everything was flushed: it survives kill -9 and a restart.
    srv.kill9();
    let srv = serve(&store, &[]);
    qemu_io_verify(&srv.uri(), 0, size);
    qemu_io_verify(&srv.uri(), wb, size);
}

#[test]
fn nbdcopy_roundtrip_qemu_img_compare_and_map() {
    require("nbdcopy");
    require("qemu-img");
    require("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let size = 128 * MIB;
    let store = create_store(tmp.path(), "vol", size);
    let srv = serve(&store, &[]);
    let data = random_bytes(0x64, (64 * MIB) as usize);
    let img = write_file(tmp.path(), "in.img", &data);

    ok_bounded(Command::new("nbdcopy").arg(&img).arg(srv.uri()), T);
    let out = tmp.path().join("out.img");
    ok_bounded(Command::new("nbdcopy").arg(srv.uri()).arg(&out), T);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len() as u64, size, "nbdcopy out: export size");
    if let Some(at) = first_diff(&got[..data.len()], &data) {
        panic!("nbdcopy round trip differs at byte {at}");
    }
    assert!(
        got[data.len()..].iter().all(|&b| b == 0),
        "the never-written half is not zero"
    );

    // qemu-img compare: the 64 MiB image against the 128 MiB export (the extra must be zero).
    let cmp = run_bounded(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&img)
            .arg(srv.uri()),
        T,
    );
    assert_eq!(cmp.status.code(), Some(0), "{}", text(&cmp));
    assert!(
        text(&cmp).contains("Images are identical"),
        "{}",
        text(&cmp)
    );
    // ...and it notices a single flipped byte.
    let mut bad = data.clone();
    bad[12_345_678] ^= 0x01;
    let bad_img = write_file(tmp.path(), "bad.img", &bad);
    let cmp = run_bounded(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&bad_img)
            .arg(srv.uri()),
        T,
    );
    assert_eq!(cmp.status.code(), Some(1), "{}", text(&cmp));
    // qemu-img reports the start of the sector that differs.
    let t = text(&cmp);
    let at: u64 = t
        .split("Content mismatch at offset ")
        .nth(1)
        .and_then(|r| r.split('!').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("qemu-img compare output: {t}"));
    assert!(
        (12_345_678 - 4095..=12_345_678).contains(&at),
        "mismatch reported at {at}: {t}"
    );

    // nbdinfo --map: data for the first 64 MiB, hole,zero for the rest.
    let map = ok_bounded(
        Command::new("nbdinfo")
            .args(["--map", "--json"])
            .arg(srv.uri()),
        T,
    );
    let extents: Vec<serde_json::Value> =
        serde_json::from_str(&map).unwrap_or_else(|e| panic!("map json: {e}\n{map}"));
    let mut at = 0u64;
    for e in &extents {
        let off = e["offset"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        assert_eq!(off, at, "extents must be contiguous: {map}");
        assert!(len > 0, "{map}");
        if off < 64 * MIB {
            assert!(
                off + len <= 64 * MIB,
                "an extent straddles the 64 MiB boundary: {map}"
            );
            assert_eq!(e["type"], 0, "written data reported as {e}");
            assert_eq!(e["description"], "data", "{e}");
        } else {
            assert_eq!(e["type"], 3, "never-written area reported as {e}");
            assert_eq!(e["description"], "hole,zero", "{e}");
        }
        at = off + len;
    }
    assert_eq!(at, size, "the map must cover the whole export: {map}");
    let plain = ok_bounded(Command::new("nbdinfo").arg("--map").arg(srv.uri()), T);
    assert!(
        plain
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["67108864", "67108864", "3", "hole,zero"]),
        "nbdinfo --map:\n{plain}"
    );
}

/// fio command for one of the two verify jobs.
fn fio_job(uri: &str, dir: &Path, job: &str, verify_only: bool) -> Command {
    require("fio");
    let mut c = Command::new("fio");
    c.current_dir(dir)
        .arg(format!("--name={job}"))
        .args(["--ioengine=nbd", "--rw=randwrite", "--verify=crc32c"])
        .args(["--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"])
        .args(["--randseed=4242", "--minimal"])
        .arg(format!("--uri={uri}"));
    match job {
        "rand4k" => c.args(["--bs=4k", "--iodepth=16", "--offset=0", "--size=48M"]),
        "mixed" => c.args([
            "--bsrange=512-128k",
            "--iodepth=8",
            "--offset=64M",
            "--size=32M",
        ]),
        other => panic!("no fio job {other}"),
    };
    if verify_only {
        c.arg("--verify_only");
    }
    c
}

/// Runs fio and checks the exit code and the error field of every terse line.
fn fio_ok(mut c: Command) -> String {
    let out = run_bounded(&mut c, Duration::from_secs(120));
    let t = text(&out);
    assert!(out.status.success(), "{c:?} failed ({}):\n{t}", out.status);
    let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("3;")).collect();
    assert!(!lines.is_empty(), "no terse output from fio:\n{t}");
    for l in lines {
        let f: Vec<&str> = l.split(';').collect();
        assert_eq!(f[4], "0", "fio job {} reported error {}:\n{t}", f[2], f[4]);
    }
    t
}

#[test]
fn fio_verify_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "vol", 128 * MIB);
    let mut srv = serve(&store, &[]);
    for job in ["rand4k", "mixed"] {
        fio_ok(fio_job(&srv.uri(), tmp.path(), job, false));
    }
    assert!(srv.terminate().success(), "{}", srv.log());
    let srv = serve(&store, &[]);
    for job in ["rand4k", "mixed"] {
        fio_ok(fio_job(&srv.uri(), tmp.path(), job, true));
    }
    // The verification really checks the data: zero a MiB the rand4k job wrote and the
    // same verify_only run must fail.
    qemu_io_ok(&srv.uri(), &[], &["write -z 1M 1M".to_string()]);
    let mut c = fio_job(&srv.uri(), tmp.path(), "rand4k", true);
    let out = run_bounded(&mut c, Duration::from_secs(120));
    assert!(
        !out.status.success(),
        "fio --verify_only passed over a zeroed region:\n{}",
        text(&out)
    );
    // The other job's region is untouched and still verifies.
    fio_ok(fio_job(&srv.uri(), tmp.path(), "mixed", true));
}

#[test]
fn unix_and_tcp_listeners_serve_the_same_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let store = create_store(tmp.path(), "vol", size);
    let sock = tmp.path().join("nbd.sock");
    let srv = serve(&store, &["--nbd", &format!("unix:{}", sock.display())]);
    let unix_uri = format!("nbd+unix:///blockrep?socket={}", sock.display());
    let unix_default = format!("nbd+unix:///?socket={}", sock.display());
    let unix_opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=blockrep",
        sock.display()
    );
    let tcp_uri = format!("{}blockrep", srv.uri());

    // Size through both.
    assert_eq!(nbdinfo_json(&unix_uri)["exports"][0]["export-size"], size);
    assert_eq!(nbdinfo_json(&tcp_uri)["exports"][0]["export-size"], size);

    // qemu-io writes through the Unix socket, reads through TCP.
    qemu_io_ok(
        &unix_opts,
        &[],
        &["write -P 0x5c 123457 65536".into(), "flush".into()],
    );
    qemu_io_ok(&tcp_uri, &[], &["read -P 0x5c 123457 65536".into()]);
    qemu_io_ok(&srv.uri(), &[], &["read -P 0 0 123457".into()]);

    // nbdsh writes through TCP, reads through the Unix socket (named and default export).
    nbdsh(
        &tcp_uri,
        "h.pwrite(bytes(range(256)) * 300, 3000001); h.flush()",
    );
    for uri in [&unix_uri, &unix_default] {
        let out = nbdsh(
            uri,
            "b = h.pread(76800, 3000001)\n\
             assert b == bytes(range(256)) * 300, 'mismatch'\n\
             assert h.pread(65536, 123457) == b'\\x5c' * 65536, 'mismatch 2'\n\
             print('SAME')",
        );
        assert!(out.contains("SAME"), "{out}");
    }
    // A mismatch through nbdsh is an error (the asserts above can fail).
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = run_bounded(
        Command::new("nbdsh")
            .env("PATH", path)
            .arg("-u")
            .arg(&unix_uri)
            .arg("-c")
            .arg("assert h.pread(1, 3000001) == b'\\x01'"),
        T,
    );
    assert!(!out.status.success(), "nbdsh assert should have failed");

    // Writes on both at once, to neighbouring ranges, then cross-check.
    let a = std::thread::spawn({
        let u = unix_opts.clone();
        move || qemu_io_ok(&u, &[], &["write -P 0x01 8M 1M".into()])
    });
    let b = std::thread::spawn({
        let u = tcp_uri.clone();
        move || qemu_io_ok(&u, &[], &["write -P 0x02 9M 1M".into()])
    });
    a.join().unwrap();
    b.join().unwrap();
    qemu_io_ok(
        &tcp_uri,
        &[],
        &["read -P 0x01 8M 1M".into(), "read -P 0x02 9M 1M".into()],
    );
    qemu_io_ok(
        &unix_opts,
        &[],
        &["read -P 0x01 8M 1M".into(), "read -P 0x02 9M 1M".into()],
    );
}

const PY_WRITER: &str = r#"
import sys, nbd
uri, off, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, 'rb').read()
h = nbd.NBD()
h.connect_uri(uri)
assert h.can_multi_conn()
# Odd-sized chunks, several in flight at once.
CH = 65536 + 123
cookies = []
for i in range(0, len(data), CH):
    cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data[i:i + CH])), off + i))
    while h.aio_in_flight() >= 8:
        h.poll(-1)
        for c in list(cookies):
            if h.aio_command_completed(c):
                cookies.remove(c)
while cookies:
    h.poll(-1)
    for c in list(cookies):
        if h.aio_command_completed(c):
            cookies.remove(c)
h.flush()
got = h.pread(len(data), off)
if got != data:
    bad = next(i for i in range(len(data)) if got[i] != data[i])
    print(f"MISMATCH at {off + bad}")
    sys.exit(1)
h.shutdown()
print("DONE")
"#;

#[test]
fn many_clients_at_once_on_disjoint_regions() {
    require("fio");
    require("nbdcopy");
    let tmp = tempfile::tempdir().unwrap();
    let size = 128 * MIB;
    let store = create_store(tmp.path(), "vol", size);
    let srv = serve(&store, &[]);
    let script = write_file(tmp.path(), "writer.py", PY_WRITER.as_bytes());
    const CLIENTS: u64 = 8;
    const REGION: u64 = 4 * MIB;
    // 8 libnbd Python clients, each writing (and verifying) its own 4 MiB region in 0..32 MiB...
    let mut children = Vec::new();
    let mut expect = Vec::new();
    for i in 0..CLIENTS {
        let data = random_bytes(1000 + i, REGION as usize);
        let file = write_file(tmp.path(), &format!("r{i}.bin"), &data);
        expect.push(data);
        let child = Command::new(SYSTEM_PYTHON)
            .arg(&script)
            .arg(srv.uri())
            .arg((i * REGION).to_string())
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python writer");
        children.push(child);
    }
    // ...while fio runs 4 verifying jobs (4 more connections) over 64..96 MiB.
    let mut fio = Command::new("fio");
    fio.current_dir(tmp.path())
        .args(["--name=par", "--ioengine=nbd", "--numjobs=4"])
        .args(["--offset=64M", "--offset_increment=8M", "--size=8M"])
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--verify=crc32c",
        ])
        .args([
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--minimal",
        ])
        .arg(format!("--uri={}", srv.uri()));
    let fio_thread = std::thread::spawn(move || fio_ok(fio));
    for (i, child) in children.into_iter().enumerate() {
        let out = wait_bounded(child, Duration::from_secs(120), "python writer");
        assert!(
            out.status.success() && text(&out).contains("DONE"),
            "writer {i} failed ({}):\n{}",
            out.status,
            text(&out)
        );
    }
    let fio_out = fio_thread.join().expect("fio failed");
    assert_eq!(
        fio_out.lines().filter(|l| l.starts_with("3;")).count(),
        4,
        "four fio jobs: {fio_out}"
    );

    // Every region holds its own writer's data, and nothing leaked into the gaps.
    let out = tmp.path().join("all.img");
    ok_bounded(Command::new("nbdcopy").arg(srv.uri()).arg(&out), T);
    let all = std::fs::read(&out).unwrap();
    for (i, data) in expect.iter().enumerate() {
        let at = i * REGION as usize;
        if let Some(d) = first_diff(&all[at..at + data.len()], data) {
            panic!("region {i} differs at byte {}", at + d);
        }
    }
    let end = (CLIENTS * REGION) as usize;
    assert!(
        all[end..(64 * MIB) as usize].iter().all(|&b| b == 0),
        "bytes between the writers' regions and fio's changed"
    );
    assert!(
        all[(96 * MIB) as usize..].iter().all(|&b| b == 0),
        "bytes after fio's regions changed"
    );
}

const PY_LARGE: &str = r#"
import sys, nbd
G = 1 << 30
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
S = h.get_size()
assert S == 8 * G, S
def check(cond, what):
    if not cond:
        print("FAIL " + what)
        sys.exit(1)
h.pwrite(b'\xbb' * 8192, 0)
h.pwrite(b'\xaa' * (1 << 20), 5 * G - 4096)          # straddles 5 GiB
h.pwrite(b'\xdd' * 8192, 4 * G - 4096)               # straddles 4 GiB (32-bit offsets)
h.pwrite(b'\xcc' * 8192, S - 8192)                   # the last blocks
check(h.pread(8192, 4 * G - 4096) == b'\xdd' * 8192, "read across 4 GiB")
check(h.pread(1 << 20, 5 * G - 4096) == b'\xaa' * (1 << 20), "read across 5 GiB")
# WRITE_ZEROES of 4 GiB - 1 (the largest 32-bit length), unaligned, may trim.
h.zero(0xffffffff, 4096)
check(h.pread(8192, 0) == b'\xbb' * 4096 + b'\0' * 4096, "zero start")
# It ends one byte short of the 0xdd pattern's end: [4096, 4 GiB + 4095).
check(h.pread(8192, 4 * G - 4096) == b'\0' * 8191 + b'\xdd', "zeroed across 4 GiB, exact end")
# TRIM of 3 GiB covering the 5 GiB pattern; then FAST_ZERO of the same.
h.trim(3 * G, 3 * G)
check(h.pread(1 << 20, 5 * G - 4096) == b'\0' * (1 << 20), "trimmed range reads zero")
h.zero(3 * G, 3 * G, nbd.CMD_FLAG_FAST_ZERO)
h.cache(0xffffffff, 0)
check(h.pread(8192, S - 8192) == b'\xcc' * 8192, "last blocks untouched")
# Block status over 4 GiB - 1 from 8 KiB: all hole,zero (3).
ext = []
h.block_status(0xffffffff - 8192, 8192, lambda meta, off, e, err: ext.extend(e))
check(len(ext) >= 2 and ext[1] == 3, "block status %r" % ext[:6])
h.flush()
h.shutdown()
print("LARGE OK")
"#;

#[test]
fn large_ranges_on_a_sparse_8gib_volume() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "vol", 8 << 30);
    let mut srv = serve(&store, &[]);
    let script = write_file(tmp.path(), "large.py", PY_LARGE.as_bytes());
    let out = run_bounded(
        Command::new(SYSTEM_PYTHON).arg(&script).arg(srv.uri()),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success() && text(&out).contains("LARGE OK"),
        "large-range checks failed ({}):\n{}",
        out.status,
        text(&out)
    );
    assert!(srv.terminate().success(), "{}", srv.log());
    // Zeroing and trimming gigabytes must not have written gigabytes of zeroes.
    let allocated: u64 = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum();
    assert!(
        allocated < 512 * MIB,
        "the store allocates {allocated} bytes after zeroing/trimming large ranges"
    );
    // And the data is still right after the restart.
    let srv = serve(&store, &[]);
    qemu_io_ok(
        &srv.uri(),
        &[],
        &[
            "read -P 0xbb 0 4096".into(),
            "read -P 0 4096 4096".into(),
            format!("read -P 0 {} 8192", (4u64 << 30) - 4096),
            format!("read -P 0xcc {} 8192", (8u64 << 30) - 8192),
        ],
    );
}

#[test]
fn mkfs_ext4_and_fsck_through_nbdfuse() {
    for tool in ["nbdfuse", "mkfs.ext4", "e2fsck", "debugfs", "umount"] {
        require(tool);
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "vol", 256 * MIB);
    let mut srv = serve(&store, &[]);
    // Some files to put in the filesystem.
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let big = random_bytes(0xF5, 3 * MIB as usize + 1234);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    std::fs::write(src.join("sub/hello.txt"), b"hello from blockrep\n").unwrap();

    let fuse = FuseMount::start(&srv.uri(), tmp.path(), "vol");
    let dev = fuse.dev();
    wait_until(
        Duration::from_secs(20),
        format_args!("nbdfuse did not expose {}", dev.display()),
        || std::fs::metadata(&dev).map(|m| m.len()).unwrap_or(0) == 256 * MIB,
    );
    ok_bounded(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&src)
            .arg(&dev),
        Duration::from_secs(120),
    );
    ok_bounded(Command::new("e2fsck").arg("-fn").arg(&dev), T);
    let hello = ok_bounded(
        Command::new("debugfs")
            .args(["-R", "cat /sub/hello.txt"])
            .arg(&dev),
        T,
    );
    assert_eq!(hello, "hello from blockrep\n");
    drop(fuse);

    // After a clean restart, a copy of the export is the same healthy filesystem.
    assert!(srv.terminate().success(), "{}", srv.log());
    let srv = serve(&store, &[]);
    let copy = tmp.path().join("copy.img");
    ok_bounded(Command::new("nbdcopy").arg(srv.uri()).arg(&copy), T);
    ok_bounded(Command::new("e2fsck").arg("-fn").arg(&copy), T);
    let dumped = tmp.path().join("big.out");
    ok_bounded(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /big.bin {}", dumped.display()))
            .arg(&copy),
        T,
    );
    assert!(
        std::fs::read(&dumped).unwrap() == big,
        "a file read back from the filesystem differs"
    );
}
