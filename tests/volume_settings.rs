//! A volume's settings (commit mode, lease TTL, failsafe) are recorded in etcd by the node
//! that creates it; a node started with other settings says which and exits, and takes no
//! part meanwhile; so does a node whose name gives a member's leader tag. Real etcd, real
//! `blockrep node` processes.

mod common;

use std::time::Duration;

use blockrep_control::LeaderTag;

use common::led::{one_at_a_time, LedShape, LedVolume};
use common::wait::wait_until;

/// Starts a new node with `extra`, waits for it to exit and checks that it said `named`.
fn exits_naming(v: &mut LedVolume, extra: &[&str], named: &str) {
    let i = v.new_node(LedShape::default());
    exits_naming_as(v, i, extra, named);
}

fn exits_naming_as(v: &mut LedVolume, i: usize, extra: &[&str], named: &str) {
    let volume = v.volume.clone();
    v.nodes[i].start(&volume, extra);
    let status = wait_until(
        Duration::from_secs(30),
        "the misconfigured node exits",
        || v.nodes[i].process().try_reap(),
    );
    let log = v.nodes[i].log_text();
    assert!(
        !status.success(),
        "it exits with an error: {status:?}\n{log}"
    );
    assert!(
        log.contains(named),
        "the log names the setting ({named}):\n{log}"
    );
    assert!(!v.nodes[i].leads());
}

#[test]
fn a_node_started_with_other_settings_than_its_volumes_names_them_and_exits() {
    let _turn = one_at_a_time();
    let dir = tempfile::Builder::new()
        .prefix("volume-settings")
        .tempdir()
        .expect("tempdir");
    let mut v = LedVolume::start(dir.path(), 1, &[]);
    exits_naming(
        &mut v,
        &["--commit", "best-effort"],
        "the volume's --commit is sync-all, this node's is best-effort",
    );
    exits_naming(
        &mut v,
        &["--failsafe"],
        "the volume's --failsafe is off, this node's is on",
    );
    // Neither registered: the volume still has its one member, and a node with the volume's
    // settings joins it.
    let members = v.list();
    assert_eq!(
        members["members"].as_array().map(|m| m.len()),
        Some(1),
        "{members}"
    );
    let i = v.new_node(LedShape::default());
    let volume = v.volume.clone();
    v.nodes[i].start(&volume, &[]);
    v.wait_in_sync(2);
}

#[test]
fn a_node_whose_name_gives_a_members_leader_tag_says_so_and_exits() {
    let _turn = one_at_a_time();
    let dir = tempfile::Builder::new()
        .prefix("volume-name-clash")
        .tempdir()
        .expect("tempdir");
    let mut v = LedVolume::start(dir.path(), 1, &[]);
    let first = v.nodes[0].name.clone();
    let tag = LeaderTag::of(&first);
    let twin = (0..1_000_000)
        .map(|i| format!("node-{i}"))
        .find(|n| LeaderTag::of(n) == tag)
        .expect("a clashing name among a million");
    let i = v.new_node(LedShape::default());
    v.nodes[i].name = twin.clone();
    exits_naming_as(
        &mut v,
        i,
        &[],
        &format!("this node's name, {twin}, gives the same leader tag ({tag}) as {first}'s"),
    );
    let members = v.list();
    assert_eq!(
        members["members"].as_array().map(|m| m.len()),
        Some(1),
        "it never registered: {members}"
    );
}
