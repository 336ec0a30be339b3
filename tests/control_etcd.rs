//! The etcd driver and `blockrep ctl` against a real etcd (Debian's 3.4): transaction
//! semantics the campaign relies on, leases that expire and are kept alive, watches, requests
//! that fail within the timeout when etcd is cut off, an etcd cluster that loses a member,
//! TLS to etcd, and the operator's list/switchover/failover on seeded records.

mod common;

// The driver lives in the binary crate; its two files are self-contained (etcd.rs reaches
// args.rs as `super::args`), so the tests compile them in as they are rather than through a
// library target.
#[allow(dead_code)]
#[path = "../src/control/args.rs"]
mod args;
#[allow(dead_code)]
#[path = "../src/control/etcd.rs"]
mod etcd;

use std::future::Future;
use std::process::Output;
use std::time::{Duration, Instant};

use args::EtcdArgs;
use blockrep_control::record::{
    encode, Identity, InSync, LeaderRecord, MemberRecord, MemberRole, MemberState,
    SwitchoverRequest,
};
use blockrep_control::{Compare, Keys, Txn, View};
use common::etcd::EtcdTls;
use common::{blockrep_timed, describe, run, text, wait_until, EtcdCluster, EtcdServer, Relay};
use etcd::{Etcd, EtcdError, LeaseId, WatchEvent};

const VOLUME: &str = "vol1";

/// A driver on its own runtime, for synchronous tests.
struct Driver {
    rt: tokio::runtime::Runtime,
    etcd: Etcd,
    keys: Keys,
}

fn args(endpoints: &[String], timeout_secs: f64) -> EtcdArgs {
    EtcdArgs {
        endpoints: endpoints.to_vec(),
        prefix: "/blockrep".into(),
        cacert: None,
        cert: None,
        key: None,
        timeout_secs,
        volume: VOLUME.into(),
    }
}

impl Driver {
    fn connect(args: &EtcdArgs) -> Driver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let etcd = rt.block_on(Etcd::connect(args)).expect("connect");
        Driver {
            rt,
            etcd,
            keys: Keys::new("/blockrep", VOLUME).expect("keys"),
        }
    }

    fn to(endpoint: &str) -> Driver {
        Driver::connect(&args(&[endpoint.to_string()], 5.0))
    }

    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    fn read(&self) -> View {
        self.block(self.etcd.read(&self.keys)).expect("read")
    }

    fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.read()
            .kvs
            .into_iter()
            .find(|kv| kv.key == key)
            .map(|kv| kv.value)
    }

    fn txn(&self, txn: &Txn, lease: Option<LeaseId>) -> bool {
        self.block(self.etcd.txn(txn, lease)).expect("txn")
    }

    fn put(&self, key: String, value: Vec<u8>, lease: Option<LeaseId>) {
        let txn = match lease {
            Some(_) => Txn::default().put_leased(key, value),
            None => Txn::default().put(key, value),
        };
        assert!(self.txn(&txn, lease));
    }

    fn grant(&self, ttl: Duration) -> (LeaseId, Duration) {
        self.block(self.etcd.grant(ttl)).expect("grant")
    }
}

/// The campaign of the control core: leader key absent, epoch counter as read.
fn campaign(keys: &Keys, counter: Option<i64>, name: &str, epoch: u64) -> Txn {
    let guard = match counter {
        Some(rev) => Compare::ModRevision(keys.epoch(), rev),
        None => Compare::Absent(keys.epoch()),
    };
    Txn::default()
        .when(Compare::Absent(keys.leader()))
        .when(guard)
        .put_leased(
            keys.leader(),
            encode(&LeaderRecord {
                name: name.into(),
                epoch,
            }),
        )
        .put(keys.epoch(), epoch.to_string().into_bytes())
}

fn mod_revision(view: &View, key: &str) -> Option<i64> {
    view.kvs
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| kv.mod_revision)
}

#[test]
fn an_absent_compare_succeeds_once_and_a_second_campaign_at_the_same_revision_fails() {
    let etcd = EtcdServer::start();
    let d = Driver::to(&etcd.endpoint());
    let (lease, _) = d.grant(Duration::from_secs(30));
    let keys = d.keys.clone();

    assert!(d.txn(&campaign(&keys, None, "n1", 1), Some(lease)));
    assert!(
        !d.txn(&campaign(&keys, None, "n2", 1), Some(lease)),
        "the leader key exists now: a second Absent campaign must fail"
    );
    let view = d.read();
    let leader = view
        .kvs
        .iter()
        .find(|kv| kv.key == keys.leader())
        .expect("leader key");
    assert_eq!(
        leader.lease, lease.0,
        "the leader key is on the campaigner's lease"
    );
    assert_eq!(d.value(&keys.epoch()), Some(b"1".to_vec()));

    // The leader goes; two candidates read the same counter revision and campaign from it:
    // exactly one gets epoch 2.
    let counter = mod_revision(&view, &keys.epoch());
    assert!(d.txn(&Txn::default().delete(keys.leader()), None));
    assert!(d.txn(&campaign(&keys, counter, "n2", 2), Some(lease)));
    let (other, _) = d.grant(Duration::from_secs(30));
    assert!(d.txn(&Txn::default().delete(keys.leader()), None));
    assert!(
        !d.txn(&campaign(&keys, counter, "n3", 2), Some(other)),
        "the counter moved since it was read: the stale campaign must fail"
    );
    assert_eq!(d.value(&keys.epoch()), Some(b"2".to_vec()));

    // A value guard holds only for the exact bytes, and never on an absent key.
    let v = Compare::Value(keys.epoch(), b"2".to_vec());
    assert!(d.txn(
        &Txn::default().when(v).put(keys.config(), b"{}".to_vec()),
        None
    ));
    let v = Compare::Value(keys.epoch(), b"1".to_vec());
    assert!(!d.txn(
        &Txn::default().when(v).put(keys.config(), b"{}".to_vec()),
        None
    ));
    let v = Compare::Value(keys.switchover(), Vec::new());
    assert!(!d.txn(
        &Txn::default().when(v).put(keys.config(), b"{}".to_vec()),
        None
    ));

    // A leased put without a lease is refused before anything is sent.
    let e = d.block(
        d.etcd
            .txn(&Txn::default().put_leased(keys.leader(), vec![]), None),
    );
    assert!(matches!(e, Err(EtcdError::NoLease(_))), "{e:?}");
}

#[test]
fn leased_keys_vanish_after_the_lease_expires() {
    let etcd = EtcdServer::start();
    let d = Driver::to(&etcd.endpoint());
    let (lease, granted) = d.grant(Duration::from_secs(2));
    assert!(granted >= Duration::from_secs(2), "granted {granted:?}");
    let key = d.keys.member("n1");
    d.put(key.clone(), b"{}".to_vec(), Some(lease));
    assert!(d.value(&key).is_some());
    let start = Instant::now();
    wait_until(
        granted + Duration::from_secs(10),
        "the leased key to vanish",
        || d.value(&key).is_none(),
    );
    // etcd never expires a lease early.
    assert!(
        start.elapsed() + Duration::from_millis(500) >= granted,
        "{:?}",
        start.elapsed()
    );
    let e = d.block(d.etcd.keep_alive(lease));
    assert!(
        matches!(e, Err(EtcdError::LeaseNotFound(id)) if id == lease.0),
        "{e:?}"
    );
    assert_eq!(d.block(d.etcd.ttl_left(lease)).expect("ttl"), None);
}

#[test]
fn keep_alive_extends_the_lease() {
    let etcd = EtcdServer::start();
    let d = Driver::to(&etcd.endpoint());
    let (lease, granted) = d.grant(Duration::from_secs(2));
    let key = d.keys.member("n1");
    d.put(key.clone(), b"{}".to_vec(), Some(lease));

    // Renewing at every poll keeps the key for well past the TTL.
    let start = Instant::now();
    wait_until(granted * 4, "three TTLs of renewals", || {
        let ttl = d.block(d.etcd.keep_alive(lease)).expect("keep-alive");
        assert_eq!(ttl, granted, "a keep-alive grants the lease's TTL again");
        assert!(d.value(&key).is_some(), "the key expired while kept alive");
        start.elapsed() > granted * 3
    });

    // Revoking ends it at once.
    d.block(d.etcd.revoke(lease)).expect("revoke");
    assert!(d.value(&key).is_none());
    let e = d.block(d.etcd.keep_alive(lease));
    assert!(matches!(e, Err(EtcdError::LeaseNotFound(_))), "{e:?}");
}

#[test]
fn watch_notifies_changes_under_the_volume_dir_only() {
    let etcd = EtcdServer::start();
    let d = Driver::to(&etcd.endpoint());
    let start = d.read().revision;
    let _runtime = d.rt.enter();
    let mut watch = d.etcd.watch(&d.keys, start);
    let outside = Keys::new("/blockrep", "other").expect("keys");
    d.put(outside.config(), b"{}".to_vec(), None);
    d.put(d.keys.config(), b"{}".to_vec(), None);
    let after = d.read().revision;
    let next = |watch: &mut etcd::Watch| {
        d.block(async { tokio::time::timeout(Duration::from_secs(10), watch.next()).await })
            .expect("a watch event within 10s")
            .expect("the watch runs")
    };
    match next(&mut watch) {
        WatchEvent::Changed { revision } => assert_eq!(revision, after, "only our put"),
        other => panic!("{other:?}"),
    }
    // Changes between a read and the watch are not missed: watching from an old revision
    // replays them.
    let mut late = d.etcd.watch(&d.keys, start);
    assert!(matches!(next(&mut late), WatchEvent::Changed { revision } if revision == after));
}

#[test]
fn a_cut_relay_fails_requests_within_the_timeout() {
    let etcd = EtcdServer::start();
    let relay = Relay::to_port(etcd.port());
    let timeout = Duration::from_secs(1);
    let d = Driver::connect(&args(&[relay.url("http")], timeout.as_secs_f64()));
    d.read();
    let (lease, _) = d.grant(Duration::from_secs(30));
    // Slack for a loaded machine: the point is "bounded by the timeout", not "instant".
    let bound = timeout + Duration::from_millis(1500);

    relay.cut();
    let start = Instant::now();
    let e = d.block(d.etcd.read(&d.keys));
    assert!(start.elapsed() <= bound, "took {:?}", start.elapsed());
    assert!(e.as_ref().is_err_and(EtcdError::is_unavailable), "{e:?}");
    let start = Instant::now();
    let e = d.block(d.etcd.keep_alive(lease));
    assert!(start.elapsed() <= bound, "took {:?}", start.elapsed());
    assert!(e.as_ref().is_err_and(EtcdError::is_unavailable), "{e:?}");

    relay.restore();
    wait_until(Duration::from_secs(20), "requests work again", || {
        d.block(d.etcd.keep_alive(lease))
    });

    // A partition that drops packets silently is a timeout, not a hang.
    relay.blackhole();
    let start = Instant::now();
    let e = d.block(d.etcd.read(&d.keys));
    assert!(start.elapsed() <= bound, "took {:?}", start.elapsed());
    assert!(e.as_ref().is_err_and(EtcdError::is_unavailable), "{e:?}");
    relay.restore();
}

#[test]
fn a_three_member_cluster_survives_the_loss_of_one() {
    let mut cluster = EtcdCluster::start(3);
    let d = Driver::connect(&args(&cluster.endpoints(), 2.0));
    d.put(d.keys.config(), b"before".to_vec(), None);
    cluster.kill(0);
    // The client may first try the dead member; it must then find the others.
    wait_until(
        Duration::from_secs(20),
        "a write through the survivors",
        || {
            d.block(d.etcd.txn(
                &Txn::default().put(d.keys.config(), b"after".to_vec()),
                None,
            ))
        },
    );
    for _ in 0..10 {
        assert_eq!(d.value(&d.keys.config()), Some(b"after".to_vec()));
    }
    // The member comes back, catches up, and serves the write it missed.
    cluster.restart(0);
    let only = Driver::to(&cluster.members[0].endpoint());
    wait_until(
        Duration::from_secs(20),
        "the restarted member has the write",
        || only.value(&only.keys.config()) == Some(b"after".to_vec()),
    );
}

#[test]
fn tls_to_etcd_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let ok = |cmd: &mut std::process::Command| {
        let out = run(cmd);
        assert!(out.status.success(), "{}", describe(&out));
    };
    ok(blockrep_timed(60).args(["certs", "init"]).arg(&ca));
    let server = dir.path().join("server");
    let client = dir.path().join("client");
    ok(blockrep_timed(60)
        .args(["certs", "issue", "--server", "etcd", "--out"])
        .arg(&server)
        .arg(&ca));
    ok(blockrep_timed(60)
        .args(["certs", "issue", "--client", "n1", "--out"])
        .arg(&client)
        .arg(&ca));
    let etcd = EtcdServer::start_tls(EtcdTls {
        ca: ca.join("ca-cert.pem"),
        cert: server.join("server-cert.pem"),
        key: server.join("server-key.pem"),
        client_auth: true,
    });
    let mut a = args(&[etcd.endpoint()], 5.0);
    a.cacert = Some(ca.join("ca-cert.pem"));
    a.cert = Some(client.join("client-cert.pem"));
    a.key = Some(client.join("client-key.pem"));
    let d = Driver::connect(&a);
    d.put(d.keys.config(), b"{}".to_vec(), None);
    assert_eq!(d.value(&d.keys.config()), Some(b"{}".to_vec()));

    // Without the client certificate etcd refuses the handshake.
    let mut anonymous = a.clone();
    anonymous.cert = None;
    anonymous.key = None;
    let d = Driver::connect(&anonymous);
    let e = d.block(d.etcd.read(&d.keys));
    assert!(
        e.is_err(),
        "etcd with --client-cert-auth served a client without one"
    );

    // A CA file that does not exist is a TLS error naming it, at connect.
    let mut missing = a.clone();
    missing.cacert = Some(dir.path().join("nope.pem"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let e = rt.block_on(Etcd::connect(&missing));
    assert!(matches!(e, Err(EtcdError::Tls { ref path, .. }) if path.ends_with("nope.pem")));
}

// ---- blockrep ctl on seeded records ---------------------------------------------------------

fn member(name: &str, role: MemberRole, state: MemberState, head: u64) -> MemberRecord {
    MemberRecord {
        name: name.into(),
        volume_id: "0b5a3c7e-0000-4000-8000-000000000001".into(),
        role,
        state,
        epoch: 3,
        head,
        head_epoch: 3,
        committed: head,
        priority: 0,
        nofailover: false,
        replication: format!("127.0.0.1:70{}", &name[1..]),
        nbd: vec![],
        admin: None,
    }
}

/// A volume led by n1 at epoch 3, with n2 in sync and n3 (ready but behind) not.
fn seed(d: &Driver) -> LeaseId {
    let (lease, _) = d.grant(Duration::from_secs(60));
    let k = &d.keys;
    let identity = Identity {
        volume_id: "0b5a3c7e-0000-4000-8000-000000000001".into(),
        size: 1 << 30,
        created_by: "n1".into(),
    };
    d.put(k.identity(), encode(&identity), None);
    d.put(k.epoch(), b"3".to_vec(), None);
    let leader = LeaderRecord {
        name: "n1".into(),
        epoch: 3,
    };
    d.put(k.leader(), encode(&leader), Some(lease));
    for m in [
        member("n1", MemberRole::Primary, MemberState::Ready, 120),
        member("n2", MemberRole::Replica, MemberState::Ready, 118),
        member("n3", MemberRole::Replica, MemberState::Ready, 40),
    ] {
        d.put(k.member(&m.name), encode(&m), Some(lease));
    }
    let insync = InSync {
        epoch: 3,
        leader: "n1".into(),
        members: vec!["n1".into(), "n2".into()],
    };
    d.put(k.insync(), encode(&insync), None);
    lease
}

fn ctl(endpoint: &str, action: &[&str]) -> Output {
    run(blockrep_timed(90)
        .args(["ctl", "--etcd-endpoints", endpoint, "--volume", VOLUME])
        .args(action))
}

fn ctl_ok(endpoint: &str, action: &[&str]) -> String {
    let out = ctl(endpoint, action);
    assert!(out.status.success(), "ctl {action:?}: {}", describe(&out));
    text(&out.stdout)
}

#[test]
fn ctl_list_shows_every_member_with_lag_and_in_sync() {
    let etcd = EtcdServer::start();
    let d = Driver::to(&etcd.endpoint());
    seed(&d);
    let out = ctl_ok(&etcd.endpoint(), &["list", "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert_eq!(v["leader"]["name"], "n1");
    assert_eq!(v["leader"]["epoch"], 3);
    assert!(v["leader"]["lease_ttl_s"]
        .as_u64()
        .is_some_and(|t| t > 0 && t <= 60));
    let members = v["members"].as_array().expect("members");
    let row = |name: &str| {
        members
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {out}"))
    };
    assert_eq!(row("n1")["leader"], true);
    assert_eq!(row("n1")["role"], "primary");
    assert_eq!(row("n2")["lag"], 2);
    assert_eq!(row("n2")["in_sync"], true);
    assert_eq!(row("n3")["lag"], 80);
    assert_eq!(row("n3")["in_sync"], false);
    assert_eq!(row("n3")["state"], "ready");
    assert!(row("n2")["lease_ttl_s"].as_u64().is_some_and(|t| t > 0));

    let table = ctl_ok(&etcd.endpoint(), &["list"]);
    assert!(
        table.contains("volume vol1: leader n1 at epoch 3"),
        "{table}"
    );
    let row_of = |table: &str, name: &str| {
        table
            .lines()
            .skip(1)
            .find(|l| l.split_whitespace().any(|w| w == name))
            .unwrap_or_else(|| panic!("{name}'s row in {table}"))
            .to_string()
    };
    let n1 = row_of(&table, "n1");
    assert!(n1.starts_with('*'), "the leader is marked: {table}");
    let n3 = row_of(&table, "n3");
    assert!(n3.contains(" 80 ") && n3.contains(" no "), "{table}");

    // An in-sync member whose key vanished (its node died) still shows, as gone.
    d.put(
        d.keys.insync(),
        encode(&InSync {
            epoch: 3,
            leader: "n1".into(),
            members: vec!["n1".into(), "n2".into(), "n4".into()],
        }),
        None,
    );
    let table = ctl_ok(&etcd.endpoint(), &["list"]);
    let n4 = row_of(&table, "n4");
    assert!(n4.contains("gone") && n4.contains("yes"), "{table}");
}

#[test]
fn ctl_switchover_refuses_a_target_that_is_not_in_sync() {
    let etcd = EtcdServer::start();
    let d = Driver::to(&etcd.endpoint());
    seed(&d);
    for (action, says) in [
        (vec!["switchover", "--to", "n3"], "not in the in-sync set"),
        (vec!["switchover", "--to", "n9"], "not a live member"),
        (vec!["switchover", "--to", "n1"], "already leads"),
        (vec!["failover", "--to", "n2"], "has a leader"),
    ] {
        let out = ctl(&etcd.endpoint(), &action);
        assert!(
            !out.status.success(),
            "{action:?} was accepted: {}",
            describe(&out)
        );
        assert!(
            text(&out.stderr).contains(says),
            "{action:?}: {}",
            describe(&out)
        );
    }
    assert_eq!(
        d.value(&d.keys.switchover()),
        None,
        "a refused request writes nothing"
    );
}

#[test]
fn ctl_switchover_writes_the_request_and_waits_for_the_target_to_lead() {
    let etcd = EtcdServer::start();
    let d = Driver::to(&etcd.endpoint());
    let lease = seed(&d);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = blockrep_timed(90);
    cmd.args([
        "ctl",
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--volume",
        VOLUME,
    ])
    .args(["switchover", "--to", "n2", "--wait", "60"]);
    let mut child =
        common::KillOnDrop::spawn_group(&mut cmd, "ctl switchover", dir.path().join("ctl.err"));

    let request: SwitchoverRequest = wait_until(
        Duration::from_secs(30),
        "ctl writes the switchover request",
        || {
            d.value(&d.keys.switchover())
                .map(|v| serde_json::from_slice(&v).expect("json"))
        },
    );
    assert_eq!(
        request,
        SwitchoverRequest {
            to: "n2".into(),
            from: Some("n1".into()),
            failover: false,
            force: false,
        }
    );
    // The nodes' part, done here by hand: the target consumes the request and takes the key.
    let handover = Txn::default().delete(d.keys.switchover()).put_leased(
        d.keys.leader(),
        encode(&LeaderRecord {
            name: "n2".into(),
            epoch: 4,
        }),
    );
    assert!(d.txn(&handover, Some(lease)));
    let status = child.wait(60);
    let stdout = std::fs::read_to_string(dir.path().join("ctl.stdout")).unwrap_or_default();
    assert!(
        status.success(),
        "ctl failed: {stdout}\n{}",
        child.stderr_text()
    );
    assert!(stdout.contains("n2 leads at epoch 4"), "{stdout}");
}

#[test]
fn ctl_switchover_that_nobody_carries_out_times_out_and_is_withdrawn() {
    let etcd = EtcdServer::start();
    let d = Driver::to(&etcd.endpoint());
    seed(&d);
    let out = ctl(
        &etcd.endpoint(),
        &["switchover", "--to", "n2", "--wait", "1"],
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("did not take over within 1s"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        d.value(&d.keys.switchover()),
        None,
        "the request was withdrawn"
    );
}

#[test]
fn ctl_failover_names_a_target_for_a_leaderless_volume_and_force_overrides_in_sync() {
    let etcd = EtcdServer::start();
    let d = Driver::to(&etcd.endpoint());
    seed(&d);
    assert!(d.txn(&Txn::default().delete(d.keys.leader()), None));

    let out = ctl(&etcd.endpoint(), &["failover", "--to", "n3", "--wait", "0"]);
    assert!(
        text(&out.stderr).contains("not in the in-sync set"),
        "{}",
        describe(&out)
    );
    assert!(!out.status.success());
    assert!(
        ctl(&etcd.endpoint(), &["switchover", "--to", "n2"])
            .status
            .code()
            != Some(0)
    );

    ctl_ok(
        &etcd.endpoint(),
        &["failover", "--to", "n3", "--force", "--wait", "0"],
    );
    let request: SwitchoverRequest =
        serde_json::from_slice(&d.value(&d.keys.switchover()).expect("request")).expect("json");
    assert_eq!(
        request,
        SwitchoverRequest {
            to: "n3".into(),
            from: None,
            failover: true,
            force: true,
        }
    );
}

#[test]
fn ctl_refuses_bad_flags_in_one_line() {
    for (flags, says) in [
        (
            vec!["--etcd-endpoints", "127.0.0.1", "--volume", "v", "list"],
            "is not http://HOST:PORT",
        ),
        (
            vec![
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--volume",
                "a/b",
                "list",
            ],
            "volume or node name",
        ),
        (
            vec![
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--etcd-cacert",
                "ca.pem",
                "--volume",
                "v",
                "list",
            ],
            "needs https:// endpoints",
        ),
    ] {
        let out = run(blockrep_timed(30).arg("ctl").args(&flags));
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{flags:?}: {}",
            describe(&out)
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // etcd that is not there: a clear error within the timeout, not a hang.
    let port = common::free_port();
    let start = Instant::now();
    let out = run(blockrep_timed(60).args([
        "ctl",
        "--etcd-endpoints",
        &format!("http://127.0.0.1:{port}"),
        "--etcd-timeout",
        "2",
        "--volume",
        "v",
        "list",
    ]));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("etcd"), "{}", describe(&out));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_watch_cut_from_etcd_reports_the_failure_and_a_change_once_it_is_back() {
    let etcd = EtcdServer::start();
    let relay = Relay::to_port(etcd.port());
    let through = Driver::connect(&args(&[relay.url("http")], 1.0));
    let direct = Driver::to(&etcd.endpoint());
    let _runtime = through.rt.enter();
    let mut watch = through.etcd.watch(&through.keys, through.read().revision);
    let next = |watch: &mut etcd::Watch| {
        through
            .block(async { tokio::time::timeout(Duration::from_secs(20), watch.next()).await })
            .expect("a watch event within 20s")
            .expect("the watch runs")
    };
    // The watch is established once a change made directly arrives through the relay.
    direct.put(direct.keys.config(), b"1".to_vec(), None);
    assert!(matches!(next(&mut watch), WatchEvent::Changed { .. }));

    relay.cut();
    assert!(matches!(next(&mut watch), WatchEvent::Failed(_)));
    // Written while the watcher is cut off: it must still learn of it.
    direct.put(direct.keys.config(), b"2".to_vec(), None);
    let written = direct.read().revision;
    relay.restore();
    wait_until(
        Duration::from_secs(30),
        "a change reported after the cut",
        || match next(&mut watch) {
            WatchEvent::Changed { revision } => revision == 0 || revision >= written,
            WatchEvent::Failed(_) => false,
        },
    );
    assert_eq!(through.value(&through.keys.config()), Some(b"2".to_vec()));
}

#[test]
fn requests_are_timed_into_the_node_s_etcd_latency_histogram() {
    let etcd = EtcdServer::start();
    let metrics = blockrep_metrics::Metrics::new().expect("metrics");
    let mut d = Driver::to(&etcd.endpoint());
    d.etcd = d.etcd.clone().with_metrics(etcd::EtcdMetrics {
        request_seconds: metrics.etcd_request.clone(),
        volume: VOLUME.into(),
    });
    d.read();
    d.read();
    let (lease, _) = d.grant(Duration::from_secs(10));
    d.block(d.etcd.keep_alive(lease)).expect("keep-alive");
    let text = metrics.render();
    for (op, n) in [("read", 2), ("grant", 1), ("keep_alive", 1)] {
        let line =
            format!(r#"blockrep_etcd_request_seconds_count{{op="{op}",volume="{VOLUME}"}} {n}"#);
        assert!(text.contains(&line), "{line} in:\n{text}");
    }
}
