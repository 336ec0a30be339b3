//! Role switching in one process, with two real nodes and a real NBD client (libnbd).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use blockrep_control::Election;
use blockrep_frontend::{ListenAddr, Tls};
use blockrep_replication::core::CommitMode;
use blockrep_storage::{CreateOptions, Epoch, OpenOptions, Store};

use super::{NodeRuntime, NodeSettings, RoleName};
use crate::control::gate::{AckGate, OnLeaseLoss};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn node(dir: &Path, name: &str) -> (NodeRuntime, u16, String) {
    let path = dir.join(name);
    Store::create(
        &path,
        &CreateOptions {
            size: 16 << 20,
            wal_capacity: CreateOptions::DEFAULT_WAL_CAPACITY,
            volume_id: None,
        },
    )
    .expect("create");
    let store = Arc::new(Store::open(&path, &OpenOptions::default()).expect("open"));
    let metrics = Arc::new(blockrep_metrics::Metrics::new().expect("metrics"));
    let metrics = crate::observe::VolumeMetrics::new(metrics, "roles");
    let nbd = free_port();
    let listen = format!("127.0.0.1:{}", free_port());
    let settings = NodeSettings {
        name: name.to_string(),
        nbd: vec![ListenAddr::Tcp(
            format!("127.0.0.1:{nbd}").parse().expect("addr"),
        )],
        export: "blockrep".into(),
        listen: listen.clone(),
        mode: CommitMode::SyncAll,
        barrier_timeout_ms: 5000,
        rebuild_rate: 0,
        confirm_interval_ms: 0,
        nbd_tls: Tls::off(),
        peer_tls: None,
        nbd_memory_budget: blockrep_frontend::DEFAULT_MEMORY_BUDGET,
    };
    (NodeRuntime::new(settings, store, metrics), nbd, listen)
}

/// Runs a Python snippet with libnbd's handle `h` connected to `port` (the system Python,
/// which has the binding); whether it exited 0.
async fn nbd_client(port: u16, script: &str) -> bool {
    let uri = format!("nbd://127.0.0.1:{port}");
    let script = script.to_string();
    tokio::task::spawn_blocking(move || {
        let program = format!("import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\n{script}\n");
        Command::new("/usr/bin/python3")
            .args(["-c", &program])
            .output()
            .map(|o| {
                if !o.status.success() {
                    eprintln!("nbd client: {}", String::from_utf8_lossy(&o.stderr));
                }
                o.status.success()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

const WRITE_FIRST: &str = "h.pwrite(b'\\x05' * 4096, 0); h.flush()";
const READ_FIRST: &str = "import sys; sys.exit(0 if h.pread(4096, 0) == b'\\x05' * 4096 else 3)";
const WRITE_AND_FLUSH: &str = "h.pwrite(b'\\x07' * 4096, 8192); h.flush()";
const READ_BACK: &str = "import sys; sys.exit(0 if h.pread(4096, 8192) == b'\\x07' * 4096 else 3)";

#[test]
fn a_node_switches_roles_and_the_new_primary_holds_every_acknowledged_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, a_nbd, a_listen) = node(dir.path(), "a");
    let (mut b, b_nbd, b_listen) = node(dir.path(), "b");
    let (mut c, _, c_listen) = node(dir.path(), "c");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        b.follow().await.expect("b follows");
        let origin = Instant::now();
        let gate = |on_loss| {
            let g = Arc::new(AckGate::new(origin, on_loss));
            g.set_deadline(Some(g.now() + 600_000));
            g
        };
        // The first node of a volume leads alone; a member that joins is replicated to.
        let a_gate = gate(OnLeaseLoss::Suspend);
        a.lead(&elected(1, &[]), a_gate.clone())
            .await
            .expect("a leads");
        assert_eq!(a.role(), RoleName::Primary { epoch: Epoch(1) });
        assert!(
            nbd_client(a_nbd, WRITE_FIRST).await,
            "a acknowledged no FLUSH"
        );
        a.set_replicas(&[("b".into(), b_listen.clone())]).await;
        assert_eq!(a.replicas(), ["b"]);
        assert!(
            nbd_client(a_nbd, WRITE_AND_FLUSH).await,
            "a acknowledged no FLUSH"
        );
        // A replica serves no NBD: a client trying it is refused and moves on.
        assert!(
            !nbd_client(b_nbd, "pass").await,
            "the replica accepted an NBD client"
        );

        a.step_down().await;
        assert_eq!(a.role(), RoleName::Standby);
        assert!(!a_gate.holds(), "a stepped down with its gate open");
        a.follow().await.expect("a follows");
        let b_gate = gate(OnLeaseLoss::IoError);
        b.lead(&elected(2, &[("a", &a_listen)]), b_gate.clone())
            .await
            .expect("b leads");
        assert_eq!(b.role(), RoleName::Primary { epoch: Epoch(2) });
        assert!(
            nbd_client(b_nbd, READ_BACK).await,
            "b lacks a's acknowledged FLUSH"
        );
        assert!(
            nbd_client(b_nbd, READ_FIRST).await,
            "b lacks what a held before b joined"
        );
        assert!(
            !nbd_client(a_nbd, "pass").await,
            "the old primary still serves NBD"
        );
        assert!(
            nbd_client(b_nbd, WRITE_AND_FLUSH).await,
            "b acknowledged no FLUSH"
        );

        // Members change in place: c joins (sync-all waits for it), then a leaves.
        c.follow().await.expect("c follows");
        let a_and_c = [
            ("a".into(), a_listen.clone()),
            ("c".into(), c_listen.clone()),
        ];
        b.set_replicas(&a_and_c).await;
        assert_eq!(b.replicas(), ["a", "c"]);
        assert!(
            nbd_client(b_nbd, WRITE_AND_FLUSH).await,
            "b acknowledged no FLUSH with c joined"
        );
        assert_eq!(c.store().durable(), b.store().head(), "c missed the FLUSH");
        b.set_replicas(&[("c".into(), c_listen.clone())]).await;
        assert!(
            nbd_client(b_nbd, WRITE_AND_FLUSH).await,
            "b acknowledged no FLUSH with a gone"
        );
        assert_eq!(c.store().durable(), b.store().head(), "c missed the FLUSH");

        // Past its deadline, b (io-error) fails requests instead of answering them.
        b_gate.set_deadline(Some(0));
        assert!(
            !nbd_client(b_nbd, READ_BACK).await,
            "b answered past its deadline"
        );
        b_gate.set_deadline(Some(b_gate.now() + 600_000));
        assert!(
            nbd_client(b_nbd, READ_BACK).await,
            "b did not resume on a renewed lease"
        );

        a.shutdown().await;
        b.shutdown().await;
        c.shutdown().await;
    });
    drop(rt);
    a.store().close().expect("close a");
    b.store().close().expect("close b");
    c.store().close().expect("close c");
}

/// An election at `epoch` with these replicas (name, address), nothing forced or vouched.
fn elected(epoch: u64, replicas: &[(&str, &str)]) -> Election {
    Election {
        epoch: Epoch(epoch),
        replicas: replicas
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect(),
        force: false,
        copies: 0,
        vouchers: Vec::new(),
    }
}
