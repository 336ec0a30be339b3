//! A node whose settings are not its volume's takes no part.

use super::*;

#[test]
fn a_node_whose_settings_are_not_its_volumes_takes_no_part() {
    let mut c = Cluster::new(&["a", "b", "c"]);
    let (b, cc) = (c.idx("b"), c.idx("c"));
    c.nodes[b].ctl.cfg.commit = "best-effort".into();
    c.nodes[cc].ctl.cfg.failsafe = true;
    c.nodes[cc].ctl.cfg.timing = Timing::from_ttl(6_000).unwrap();
    c.advance(100, 3);
    c.adopt_volume();
    c.advance(100, 3);
    assert_eq!(c.leaders(), ["a"]);
    let view = VolumeView::parse(&c.keys, &c.etcd.range(c.now, c.keys.dir())).unwrap();
    let config = view
        .config
        .expect("the first node records the volume's settings");
    assert_eq!(
        (config.commit.as_str(), config.ttl_ms, config.failsafe),
        ("sync-all", 3_000, false)
    );
    let said = |i: usize| -> Vec<Vec<SettingDifference>> {
        c.nodes[i]
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Misconfigured { differences } => Some(differences.clone()),
                _ => None,
            })
            .collect()
    };
    let flags = |d: &[SettingDifference]| d.iter().map(|d| d.flag).collect::<Vec<_>>();
    assert_eq!(said(b).len(), 1, "said once: {:?}", said(b));
    assert_eq!(flags(&said(b)[0]), ["--commit"]);
    assert_eq!(flags(&said(cc)[0]), ["--etcd-ttl", "--failsafe"]);
    assert_eq!(
        said(b)[0][0].to_string(),
        "the volume's --commit is sync-all, this node's is best-effort"
    );
    assert!(!view.members.contains_key("b") && !view.members.contains_key("c"));

    // With the leader gone, neither of them leads.
    let a = c.idx("a");
    c.nodes[a].reaches_etcd = false;
    c.advance(100, 100);
    assert!(c.leaders().iter().all(|l| *l == "a" || l.is_empty()));
    assert!(c.led_at(b).is_none() && c.led_at(cc).is_none());
}

#[test]
fn a_volume_recorded_before_failsafe_was_reads_as_failsafe_off() {
    let old = br#"{"commit":"sync-all","ttl_ms":15000}"#;
    let config: crate::record::VolumeConfig = serde_json::from_slice(old).unwrap();
    assert!(!config.failsafe);
}

/// A name whose leader tag is `name`'s (found by search: tags are 16 bits).
fn name_clashing_with(name: &str) -> String {
    let tag = LeaderTag::of(name);
    (0..1_000_000)
        .map(|i| format!("node-{i}"))
        .find(|n| LeaderTag::of(n) == tag)
        .expect("a clashing name among a million")
}

#[test]
fn members_leader_tags_differ() {
    let twin = name_clashing_with("a");
    let mut c = Cluster::new(&["a", &twin]);
    c.advance(100, 3);
    c.adopt_volume();
    c.advance(100, 3);
    assert_eq!(c.leaders(), ["a"]);
    let t = c.idx(&twin);
    let clashes: Vec<&Action> = c.nodes[t]
        .actions
        .iter()
        .filter(|a| matches!(a, Action::NameClash { .. }))
        .collect();
    assert_eq!(
        clashes,
        [&Action::NameClash {
            other: "a".into(),
            tag: LeaderTag::of("a")
        }],
        "said once"
    );
    // It sits out: with the leader gone it never leads, so its epochs never meet a's.
    let view = VolumeView::parse(&c.keys, &c.etcd.range(c.now, c.keys.dir())).unwrap();
    assert!(!view.members.contains_key(&twin), "it never registered");
    let a = c.idx("a");
    c.nodes[a].reaches_etcd = false;
    c.advance(100, 100);
    assert!(c.led_at(t).is_none());
    // a, registered first, took no part in the clash.
    assert!(!c.nodes[a]
        .actions
        .iter()
        .any(|x| matches!(x, Action::NameClash { .. } | Action::Misconfigured { .. })));
}
