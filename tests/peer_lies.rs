//! Peers can't lie, end to end: a raw TCP client that speaks the replication wire format
//! (frames built with the crate's own `wire` encoder) against a real `blockrep replica`
//! process. A replica that is sent something no honest primary sends (a write entry whose
//! payload is shorter than its length, a fence at the last epoch there is) refuses it with a
//! named reason (its log, or a `Reject` naming it), keeps running, changes nothing in its
//! store, and still takes a real primary afterwards.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blockrep_replication::wire::{self, Body, Frame, RejectReason, HEADER_LEN};
use blockrep_storage::{Epoch, Lsn, RecordKind, VolumeId, WalRecord};
use bytes::{Bytes, BytesMut};

use common::*;

const VOLUME: u64 = 32 * MIB;

fn create(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    run_ok(
        blockrep_timed(60)
            .arg("create")
            .arg(&dir)
            .arg("--size")
            .arg(VOLUME.to_string())
            .arg("--wal-size")
            .arg("64MiB"),
    );
    dir
}

fn start(name: &str, store: &Path, port: u16, args: Vec<OsString>, ready: &'static str) -> Node {
    Node::builder(name, store, port, args)
        .ready(Ready::Line(ready))
        .stop_timeout(30)
        .try_start()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn replica(store: &Path) -> Node {
    let port = free_port();
    let args = vec![
        "replica".into(),
        store.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
    ];
    start("r1", store, port, args, "listening on")
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the replica");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s
}

fn send(s: &mut TcpStream, epoch: Epoch, body: Body) {
    let mut buf = BytesMut::new();
    wire::encode(&Frame { epoch, body }, &mut buf);
    s.write_all(&buf).expect("send a frame");
}

/// The next frame, decoded by the crate's own decoder; `None` once the replica closed.
fn receive(s: &mut TcpStream, what: &str) -> Option<Frame> {
    let mut buf = vec![0u8; HEADER_LEN];
    match s.read_exact(&mut buf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("{what}: reading a frame header: {e}"),
    }
    let total = wire::frame_len(&buf)
        .unwrap_or_else(|e| panic!("{what}: bad header: {e}"))
        .expect("a whole header");
    buf.resize(total, 0);
    s.read_exact(&mut buf[HEADER_LEN..])
        .unwrap_or_else(|e| panic!("{what}: reading a frame body: {e}"));
    Some(wire::decode(Bytes::from(buf)).unwrap_or_else(|e| panic!("{what}: {e}")))
}

/// The replica answers with a `Reject` for `reason` and then closes the connection.
fn expect_refused(s: &mut TcpStream, reason: RejectReason, what: &str) -> String {
    let frame = receive(s, what).unwrap_or_else(|| panic!("{what}: closed with no Reject"));
    let message = match frame.body {
        Body::Reject { reason: r, message } if r == reason => message,
        other => panic!("{what}: expected a {reason:?} Reject, got {other:?}"),
    };
    assert!(
        receive(s, what).is_none(),
        "{what}: the replica must close the connection after refusing"
    );
    message
}

fn hello(volume_id: VolumeId) -> Body {
    Body::Hello {
        volume_id,
        volume_size: VOLUME,
        primary_store: VolumeId([0x11; 16]),
        head: Lsn(1),
        committed: Lsn::ZERO,
    }
}

#[test]
fn a_short_write_entry_is_refused_and_the_replica_keeps_serving() {
    require_python_nbd();
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let p_store = create(tmp.path(), "p");
    let r_store = create(tmp.path(), "r1");
    let mut r = replica(&r_store);
    let mark = r.mark();

    // A valid hello at epoch 1 for the primary's volume, then one write entry whose payload
    // (100 bytes, its checksum correct) is shorter than its length (8 KiB).
    let mut s = connect(&r.addr());
    send(&mut s, Epoch(1), hello(volume_id(&p_store)));
    match receive(&mut s, "hello").map(|f| f.body) {
        Some(Body::HelloOk { durable, .. }) => assert_eq!(durable, Lsn::ZERO),
        other => panic!("the replica did not accept the hello: {other:?}"),
    }
    let short = WalRecord::new(
        Lsn(1),
        Epoch(1),
        RecordKind::Write,
        0,
        8192,
        Bytes::from(vec![0xAB; 100]),
    );
    let body = Body::Entries {
        committed: Lsn::ZERO,
        records: vec![short],
    };
    send(&mut s, Epoch(1), body);
    // The decoder refuses it (a typed `WireError::BadEntry`): the connection ends, named in
    // the log, and no store action for it ever exists.
    assert!(
        receive(&mut s, "short write entry").is_none(),
        "the replica must close the connection on a short write entry"
    );

    assert!(
        r.running(),
        "the replica died on the short entry:\n{}",
        r.log()
    );
    r.wait_log(
        mark,
        &["entry 1 refused", "8192 bytes carries 100 payload bytes"],
        10,
    );

    // A well-formed entry past the end of the volume gets past the decoder; the replica
    // core refuses it by name.
    let mut s = connect(&r.addr());
    send(&mut s, Epoch(1), hello(volume_id(&p_store)));
    assert!(matches!(
        receive(&mut s, "second hello").map(|f| f.body),
        Some(Body::HelloOk { .. })
    ));
    let past_end = WalRecord::new(
        Lsn(1),
        Epoch(1),
        RecordKind::Write,
        VOLUME,
        4096,
        Bytes::from(vec![0xCD; 4096]),
    );
    let body = Body::Entries {
        committed: Lsn::ZERO,
        records: vec![past_end],
    };
    send(&mut s, Epoch(1), body);
    let message = expect_refused(&mut s, RejectReason::BadEntry, "entry past the volume");
    assert!(message.contains("runs past the end"), "{message}");
    assert!(r.running(), "the replica died:\n{}", r.log());
    assert!(!r.log().contains("panicked"), "{}", r.log());

    // A real primary still connects, is in sync, and its FLUSH reaches the replica.
    let port = free_port();
    let args: Vec<OsString> = vec![
        "serve".into(),
        p_store.as_os_str().into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
        "--replica".into(),
        format!("r1={}", r.addr()).into(),
        "--epoch".into(),
        "2".into(),
    ];
    let mut p = start("p", &p_store, port, args, "serving");
    p.wait_log(0, &["replica=r1", "state=\"in_sync\""], 30);
    let d = client::data(tmp.path(), "d", 7, 64 * 1024);
    let mut c = Client::connect(&p.uri(), tmp.path(), "p");
    c.write_ok(0, &d);
    client::assert_ok(&c.flush(), "FLUSH with the replica in sync after the lie");
    drop(c);
    p.stop_ok();
    r.stop_ok();
    assert_eq!(inspect_json(&r_store)["epoch"], 2);
}

#[test]
fn a_fence_at_the_last_epoch_is_refused_and_nothing_is_persisted() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let r_store = create(tmp.path(), "r1");
    let before = inspect_json(&r_store)["epoch"].clone();
    let mut r = replica(&r_store);
    let mark = r.mark();

    let mut s = connect(&r.addr());
    let fence = Body::Probe {
        fence: Some(VolumeId([0x22; 16])),
    };
    send(&mut s, Epoch::MAX, fence);
    let message = expect_refused(&mut s, RejectReason::UnfollowableEpoch, "fence at u64::MAX");
    assert!(message.contains("no primary could follow it"), "{message}");
    r.wait_log(mark, &["no primary could follow it"], 10);

    // A plain probe still answers, at the epoch the store had.
    let mut s = connect(&r.addr());
    send(&mut s, Epoch(0), Body::Probe { fence: None });
    let reply = receive(&mut s, "probe").expect("a probe reply");
    assert!(matches!(reply.body, Body::ProbeReply { .. }), "{reply:?}");
    assert_eq!(reply.epoch, Epoch(0));
    assert!(r.running(), "{}", r.log());
    r.stop_ok();
    assert_eq!(inspect_json(&r_store)["epoch"], before);
}
