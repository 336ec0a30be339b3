//! A store on a full filesystem: the NBD client is told ENOSPC ("No space left on device"),
//! reads keep working, and writes work again once space is freed, without a restart.

mod common;

use std::time::Duration;

use common::tmpfs::Tmpfs;
use common::*;

/// Runs qemu-io with `cmds` against `uri`; returns what it printed.
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = timed(120, "qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = run(&mut c);
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

fn write_and_flush(uri: &str, pattern: u8, offset: u64, len: u64) -> String {
    qemu_io(
        uri,
        &[format!("write -P {pattern} {offset} {len}"), "flush".into()],
    )
}

fn assert_reads_back(uri: &str, pattern: u8, offset: u64, len: u64, what: &str) {
    let out = qemu_io(uri, &[format!("read -P {pattern} {offset} {len}")]);
    assert!(
        out.contains(&format!("read {len}/{len} bytes")) && !out.contains("failed"),
        "{what}: {out}"
    );
}

#[test]
fn a_full_filesystem_is_enospc_reads_go_on_and_writes_resume_once_space_is_freed() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("mnt"), "96m");
    // The WAL (64 MiB, written in full at creation) leaves ~32 MiB for the data file, a
    // quarter of the volume.
    let store = create_store(&fs.path, "s", 128 * MIB);
    let port = free_port();
    let node = Node::builder("serve", &store, port, node::serve_args(&store, port, &[]))
        .log(dir.path().join("serve.log"))
        .wait_for_port()
        .start();
    let uri = node.uri();

    const CHUNK: u64 = 8 * MIB;
    let mut written = Vec::new();
    let failure = loop {
        let at = written.len() as u64 * CHUNK;
        assert!(
            at < 128 * MIB,
            "the whole volume was written on a 96 MiB filesystem"
        );
        let pattern = 0x11 + written.len() as u8;
        let out = write_and_flush(&uri, pattern, at, CHUNK);
        if out.contains("write failed") {
            break (at, out);
        }
        assert!(out.contains(&format!("wrote {CHUNK}/{CHUNK}")), "{out}");
        written.push((at, pattern));
    };
    let (full_at, out) = failure;
    assert!(
        out.contains("No space left on device"),
        "the client saw another error than ENOSPC: {out}"
    );
    assert!(written.len() >= 2, "no write fitted: {written:?}");

    // Everything written before the filesystem filled reads back.
    for &(at, pattern) in &written {
        assert_reads_back(&uri, pattern, at, CHUNK, "a read on a full filesystem");
    }
    // Still full: another write fails the same way, and the store has not failed.
    let again = write_and_flush(&uri, 0x77, full_at, CHUNK);
    assert!(again.contains("No space left on device"), "{again}");

    // Freeing space (a TRIM punches the blocks out of the data file at its checkpoint)
    // lets writes in again, without a restart.
    let (freed_at, _) = written[0];
    let out = qemu_io(
        &uri,
        &[format!("discard {freed_at} {}", 2 * CHUNK), "flush".into()],
    );
    assert!(!out.contains("failed"), "{out}");
    wait_until(
        Duration::from_secs(60),
        "a write after space was freed",
        || {
            let out = write_and_flush(&uri, 0x77, full_at, CHUNK);
            if out.contains(&format!("wrote {CHUNK}/{CHUNK}")) && !out.contains("failed") {
                Ok(())
            } else {
                Err(out)
            }
        },
    );
    assert_reads_back(
        &uri,
        0x77,
        full_at,
        CHUNK,
        "the write made after freeing space",
    );
    let log = node.log();
    assert!(
        !log.contains("accepts no more writes"),
        "the store failed instead of refusing one write: {log}"
    );
    drop(node);
    drop(fs);
}
