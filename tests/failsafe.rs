//! `blockrep node --failsafe` and best-effort under `node`, for real: one etcd (Debian's
//! 3.4), three nodes on a 3 s lease TTL, and the failover writer that logs every
//! acknowledged FLUSH. (Without `--failsafe` an etcd outage stops acknowledgements:
//! tests/failover.rs has that case.)

mod common;

use std::time::Duration;

use blockrep_control::LeaderTag;
use blockrep_storage::Epoch;

use common::admin::Scrape;
use common::led::{wall, LedSetup, LedShape, LedVolume, FLUSHES, TTL};

/// The renew interval the nodes run with (TTL/3): a failsafe leader acknowledges at most
/// this long after the send time of the last barrier every needed replica answered.
const RENEW: f64 = TTL as f64 / 3.0;

fn failsafe_gauge(v: &LedVolume, i: usize) -> f64 {
    Scrape::of(v.nodes[i].metrics).get("blockrep_failsafe_active", &[])
}

#[test]
fn with_etcd_down_a_failsafe_leader_serves_on_until_a_replica_stops_answering() {
    let s = LedSetup::start("failsafe-etcd-down", LedShape::default(), &["--failsafe"]);
    // Dropped in reverse: the writer, the nodes and etcd, the directory, then the turn.
    let (_turn, _dir) = (s.turn, s.dir);
    let mut v = s.volume;
    let mut writer = s.writer;
    let leader = v.wait_for_leader(Duration::from_secs(30));
    let uri = v.nodes[leader].uri();
    assert_eq!(
        failsafe_gauge(&v, leader),
        0.0,
        "etcd answers: the lease holds"
    );
    let down = wall();
    v.etcd.kill(0);
    // Well past the lease deadline it would have stopped at, it still acknowledges FLUSHes.
    let past_lease = down + TTL as f64;
    writer.wait_flushes(&uri, past_lease, FLUSHES, Duration::from_secs(TTL + 30));
    assert!(v.nodes[leader].leads(), "{}", v.logs());
    assert_eq!(failsafe_gauge(&v, leader), 1.0);
    let url = format!("http://127.0.0.1:{}/v1/status", v.nodes[leader].metrics);
    let status: serde_json::Value =
        serde_json::from_str(&common::admin::get_ok(&url)).expect("status JSON");
    assert_eq!(status["control"]["failsafe"], true, "{status}");
    for (i, n) in v.nodes.iter().enumerate() {
        assert_eq!(
            i == leader,
            n.leads(),
            "{}: nobody else is promoted",
            n.name
        );
    }
    // A replica dies: its answers stop, and so do the leader's acknowledgements, by the
    // send time of the last barrier it answered (before the kill) plus the renew interval.
    let replica = (leader + 1) % v.nodes.len();
    let killed = wall();
    v.nodes[replica].process().kill9();
    common::wait_until(
        Duration::from_secs(TTL + 10),
        "the failsafe leader stops leading",
        || !v.nodes[leader].leads(),
    );
    // A second of slack for the writer's own logging of a reply sent just in time.
    let late = writer.acks_by_after(&uri, killed + RENEW + 1.0);
    assert!(
        late.is_empty(),
        "acknowledged {late:?} more than {RENEW} s after a needed replica died\n{}",
        v.logs()
    );
    assert_eq!(failsafe_gauge(&v, leader), 0.0);
    let fences = Scrape::of(v.nodes[leader].metrics).get(
        "blockrep_fence_events_total",
        &[("reason", "lease_expired")],
    );
    assert_eq!(fences, 1.0);
    // etcd and the replica come back: the volume is led again with every acknowledged FLUSH.
    let back = wall();
    v.etcd.restart(0);
    let volume = v.volume.clone();
    v.nodes[replica].start(&volume, &["--failsafe"]);
    let new = v.wait_for_leader(Duration::from_secs(60));
    let uri = v.nodes[new].uri();
    writer.wait_flushes(&uri, back, FLUSHES, Duration::from_secs(90));
    writer.stop_and_verify(&v, &uri);
}

#[test]
fn failsafe_under_best_effort_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = common::run(common::blockrep_timed(30).args([
        "node",
        &dir.path().join("n1").display().to_string(),
        "--volume",
        "vol",
        "--name",
        "n1",
        "--etcd-endpoints",
        "http://127.0.0.1:9",
        "--nbd",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--commit",
        "best-effort",
        "--failsafe",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", common::describe(&out));
    let err = common::text(&out.stderr);
    assert!(
        err.contains("--failsafe needs --commit sync-all or sync-quorum"),
        "{err}"
    );
}

#[test]
fn a_best_effort_takeover_reports_its_loss_window() {
    let s = LedSetup::start(
        "failsafe-best-effort",
        LedShape::default(),
        &["--commit", "best-effort"],
    );
    // Dropped in reverse: the writer, the nodes and etcd, the directory, then the turn.
    let (_turn, _dir) = (s.turn, s.dir);
    let mut v = s.volume;
    let mut writer = s.writer;
    let old = v.wait_for_leader(Duration::from_secs(30));
    let killed = wall();
    v.nodes[old].process().kill9();
    let new = v.wait_for_new_leader(old, Duration::from_secs(TTL + 5));
    let uri = v.nodes[new].uri();
    writer.wait_flushes(&uri, killed, 1, Duration::from_secs(TTL + 5));
    let url = format!("http://127.0.0.1:{}/v1/status", v.nodes[new].metrics);
    let status: serde_json::Value =
        serde_json::from_str(&common::admin::get_ok(&url)).expect("status JSON");
    let control = &status["control"];
    assert_eq!(
        control["loss_window_from"],
        v.nodes[old].name.as_str(),
        "{status}"
    );
    let lsns = control["loss_window_lsns"].as_u64();
    assert!(lsns.is_some(), "no loss window in {status}");
    let log = v.nodes[new].log_text();
    let said = log.matches("loss window").count();
    assert_eq!(said, 1, "the loss window is logged once:\n{log}");
    // The survivors never led before: neither reports a window of its own.
    for (i, n) in v.nodes.iter().enumerate() {
        if i != new && i != old {
            let url = format!("http://127.0.0.1:{}/v1/status", n.metrics);
            let status: serde_json::Value =
                serde_json::from_str(&common::admin::get_ok(&url)).expect("status JSON");
            assert!(
                status["control"].get("loss_window_lsns").is_none(),
                "{status}"
            );
        }
    }
    eprintln!(
        "best-effort takeover by {}: loss window {lsns:?} LSNs",
        v.nodes[new].name
    );
}

#[test]
fn a_failsafe_leader_cut_from_etcd_alone_stops_before_the_next_leader_acknowledges() {
    let s = LedSetup::start("failsafe-cut", LedShape::default(), &["--failsafe"]);
    // Dropped in reverse: the writer, the nodes and etcd, the directory, then the turn.
    let (_turn, _dir) = (s.turn, s.dir);
    let v = s.volume;
    let mut writer = s.writer;
    let old = v.wait_for_leader(Duration::from_secs(30));
    let cut = wall();
    // etcd expires its lease and another node takes over, while its replicas still answer
    // it until the new leader's promotion fences them.
    v.nodes[old].relay.cut();
    let new = v.wait_for_new_leader(old, Duration::from_secs(TTL + 15));
    let uri = v.nodes[new].uri();
    writer.wait_flushes(&uri, cut, FLUSHES, Duration::from_secs(60));
    common::wait_until(
        Duration::from_secs(TTL + 10),
        "the cut node stops leading",
        || !v.nodes[old].leads(),
    );
    // The old leader stepped down before the new one's hold ran out, and the new one
    // acknowledged nothing before that.
    let old_log = v.nodes[old].log_text();
    let new_log = v.nodes[new].log_text();
    let stepped_down = logged_at(&old_log, "stepping down").expect("the old leader stepped down");
    let hold_from = logged_at(&new_log, "failsafe hold").expect("the new leader held");
    let hold = RENEW + TTL as f64 / 8.0;
    assert!(
        stepped_down < hold_from + hold,
        "the old leader stepped down {:.3} s after the new one's hold began (hold {hold} s)\n{}",
        stepped_down - hold_from,
        v.logs()
    );
    let first_new = writer
        .first_ack_by(&uri, cut)
        .expect("the new leader acknowledged");
    assert!(
        first_new >= hold_from + hold,
        "the new leader acknowledged {:.3} s into its {hold} s hold",
        first_new - hold_from
    );
    eprintln!(
        "cut at 0: old leader stepped down at {:.3} s, new hold from {:.3} s, first \
         acknowledgement by the new leader at {:.3} s",
        stepped_down - cut,
        hold_from - cut,
        first_new - cut
    );
    v.nodes[old].relay.restore();
    v.wait_in_sync(3);
    writer.stop_and_verify(&v, &uri);
}

/// The wall-clock time (Unix seconds) of the first line of `log` that contains `what`; the
/// logs' timestamps are RFC 3339 in UTC (`2026-12-02T12:50:16.064250Z`).
fn logged_at(log: &str, what: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(what))?;
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.trim_end_matches('Z').split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let t: Vec<f64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days since 1970-01-01 of a Gregorian date, counted in 400-year eras from March.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2])
}

#[test]
fn a_failsafe_leader_goes_on_leading_on_its_lease_when_etcd_returns() {
    let s = LedSetup::start(
        "failsafe-etcd-returns",
        LedShape::default(),
        &["--failsafe"],
    );
    // Dropped in reverse: the writer, the nodes and etcd, the directory, then the turn.
    let (_turn, _dir) = (s.turn, s.dir);
    let mut v = s.volume;
    let mut writer = s.writer;
    let leader = v.wait_for_leader(Duration::from_secs(30));
    let uri = v.nodes[leader].uri();
    let down = wall();
    v.etcd.kill(0);
    writer.wait_flushes(
        &uri,
        down + TTL as f64,
        FLUSHES,
        Duration::from_secs(TTL + 30),
    );
    assert_eq!(failsafe_gauge(&v, leader), 1.0);
    // etcd keeps the leader's lease across its restart (with its TTL again), so the leader
    // renews it and leads on: no step-down, no new epoch, nobody else promoted.
    let back = wall();
    v.etcd.restart(0);
    common::wait_until(
        Duration::from_secs(30),
        "the leader leads on its lease again",
        || failsafe_gauge(&v, leader) == 0.0,
    );
    writer.wait_flushes(&uri, back, FLUSHES, Duration::from_secs(30));
    let scrape = Scrape::of(v.nodes[leader].metrics);
    for reason in ["lease_expired", "leader_key_lost", "higher_epoch"] {
        let fences = scrape.get("blockrep_fence_events_total", &[("reason", reason)]);
        assert_eq!(fences, 0.0, "{reason}\n{}", v.logs());
    }
    assert_eq!(scrape.get("blockrep_failovers_total", &[]), 1.0);
    let list = v.list();
    assert_eq!(
        list["leader"]["name"],
        v.nodes[leader].name.as_str(),
        "{list}"
    );
    // Still the first epoch etcd handed out: the one the leader's first campaign took.
    let first = LeaderTag::of(&v.nodes[leader].name).first_epoch_above(Epoch(0));
    assert_eq!(list["epoch_counter"].as_u64(), first.map(|e| e.0), "{list}");
    writer.stop_and_verify(&v, &uri);
}
