//! PostgreSQL on ext4 on an etcd-led volume: kill -9 the primary mid-stream of commits, let
//! etcd elect another node with nobody watching, remount through it, and every acknowledged
//! COMMIT is there (tests/postgres_failover.rs does the same with a manual failover; the
//! PostgreSQL side is tests/common/postgres.rs).
//!
//! The stack: PostgreSQL (fsync on, data checksums) → ext4 → loop → nbdfuse → the leader of
//! three `blockrep node` processes (sync-all, a 3 s lease) on one etcd.

mod common;

use std::time::{Duration, Instant};

use common::files::e2fsck_clean;
use common::fuse::Teardown;
use common::led::{LedVolume, TTL};
use common::postgres::{abandon, PgSite};
use common::*;

#[test]
fn postgres_commits_survive_the_leaders_kill9_and_an_unattended_failover() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path();
    let site = PgSite::new(base);
    let nodes = base.join("nodes");
    std::fs::create_dir(&nodes).expect("the nodes' directory");
    let v = LedVolume::start_sized(&nodes, 3, "1GiB", &[]);
    let old = v.wait_for_leader(Duration::from_secs(30));

    let mut fuse1 =
        FuseMount::start(&v.nodes[old].uri(), base, "first").with_teardown(Teardown::Lazy);
    let pg = site.init_on(&mut fuse1);
    eprintln!("setup done after {:?}", started.elapsed());
    let load = site.load(&pg, &|| v.logs());

    let acks_before_kill = load.client.acked().len();
    let mut v = v;
    let killed = Instant::now();
    v.nodes[old].process().kill9();
    let acked = load.finish(acks_before_kill);
    abandon(pg, fuse1);

    // Nobody runs a command: etcd's lease expires and another node leads.
    let new = v.wait_for_new_leader(old, Duration::from_secs(TTL + 10));
    eprintln!(
        "{} leads {:?} after the kill",
        v.nodes[new].name,
        killed.elapsed()
    );
    let mut fuse2 =
        FuseMount::start(&v.nodes[new].uri(), base, "second").with_teardown(Teardown::Lazy);
    fuse2.mount_loop();
    let pg = site.start_on(&fuse2, "postgres-2.log");
    let rows = site.verify_recovered(pg, &acked);
    fuse2.unmount_loop();
    e2fsck_clean(&fuse2.dev());
    fuse2.unmount_fuse();
    eprintln!(
        "done in {:?}: {} commits acknowledged, {rows} rows after the failover",
        started.elapsed(),
        acked.len()
    );
}
