//! Who may take over a volume, and in which order.
//!
//! Only a member that holds every acknowledged write may lead, and only one the promotion
//! rule (`blockrep_replication::core::promotion`) would then accept, or its term is wasted:
//! its store is a whole image of this volume (`Ready`, the volume's id), the operator has not
//! excluded it (`--nofailover`), and it is in the in-sync set at the latest epoch (the leader
//! removes a member there before it acknowledges anything that skips it, so each member of
//! the set holds every acknowledged write). Under sync-quorum a member outside the set may
//! lead too if its log reaches at least as far, by (head epoch, head), as that of a member
//! of the set the view shows alive: it then holds that member's whole log (logs that end at
//! the same epoch agree up to the shorter one; a later epoch's primary held every committed
//! entry before it), so every acknowledged write, and the promotion, which reads a majority
//! and refuses anyone less complete than one of them, checks the claim against the stores
//! themselves. Without it, the most complete copy, once it dropped out of the set, was the
//! only one the promotion accepted and one etcd would not elect. Requiring a live member of
//! the set keeps a lone survivor that lags from being elected. Under sync-all and best-effort
//! a member outside the set may lead if its log ends at a later epoch than the log of every
//! live member of the set: the promotion refuses each of them while it answers (it holds a
//! later primary's entries), and it holds every acknowledged write if one of them really
//! ends at an earlier epoch, which the promotion checks on their answers
//! (`promotion::vouched`, given the set by [`outside_the_set`]). For a volume no one has led
//! yet, only the node whose store became the volume. Among those, the longest lineage first
//! (the epoch of the last entry, then its LSN), then the higher `--priority`, then the name,
//! so every node computes the same order from the same view, and the first is the most
//! complete copy the promotion asks for.

use std::cmp::Ordering;

use crate::record::{MemberRecord, MemberState, VolumeView};

/// Why a member may not take over (for logs and `blockrep ctl list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    NoVolume,
    OtherVolume,
    NotInSync,
    NotReady,
    NoFailover,
}

impl Ineligible {
    pub fn label(self) -> &'static str {
        match self {
            Ineligible::NoVolume => "the volume has no identity yet",
            Ineligible::OtherVolume => "its store is not (yet) this volume",
            Ineligible::NotInSync => "not in the in-sync set",
            Ineligible::NotReady => "not ready (starting or rebuilding)",
            Ineligible::NoFailover => "--nofailover",
        }
    }
}

/// What, beside its store, makes a member safe to elect: the commit mode's promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Sync-all and best-effort: the in-sync set at the latest epoch holds every acknowledged
    /// write.
    InSyncSet,
    /// Sync-quorum: also a member whose log contains a live in-sync member's, which the
    /// promotion's read of a majority then checks against the stores.
    Majority,
}

impl Rule {
    /// The rule of a commit mode by its name (an unknown one gets the stricter rule).
    pub fn for_commit(commit: &str) -> Rule {
        if commit == "sync-quorum" {
            Rule::Majority
        } else {
            Rule::InSyncSet
        }
    }
}

/// Whether `member` may take over under `rule`, ignoring its position.
pub fn eligibility(view: &VolumeView, member: &MemberRecord, rule: Rule) -> Result<(), Ineligible> {
    let identity = view.identity.as_ref().ok_or(Ineligible::NoVolume)?;
    if member.volume_id != identity.volume_id {
        return Err(Ineligible::OtherVolume);
    }
    let in_sync = match &view.insync {
        Some(set) => {
            set.value.contains(&member.name)
                || match rule {
                    Rule::Majority => holds_a_live_in_sync_log(view, member),
                    Rule::InSyncSet => ends_past_every_live_in_sync_log(view, member),
                }
        }
        None => identity.created_by == member.name,
    };
    if !in_sync {
        return Err(Ineligible::NotInSync);
    }
    if member.state != MemberState::Ready {
        return Err(Ineligible::NotReady);
    }
    if member.nofailover {
        return Err(Ineligible::NoFailover);
    }
    Ok(())
}

/// Whether `member`'s log reaches at least as far as that of a member of the in-sync set the
/// view shows alive (so it contains that log).
fn holds_a_live_in_sync_log(view: &VolumeView, member: &MemberRecord) -> bool {
    let Some(set) = &view.insync else {
        return false;
    };
    view.members
        .values()
        .filter(|m| set.value.contains(&m.name) && m.volume_id == member.volume_id)
        .any(|m| member.position() >= m.position())
}

/// Whether `member`'s log ends at a later epoch than the log of every member of the in-sync
/// set the view shows alive, and there is one. The promotion refuses each of those members
/// while `member` answers (it holds a later primary's entries), so without this nobody
/// electable could ever serve; the promotion checks the claim on what the members answer
/// (`promotion::vouched`, told the set through [`outside_the_set`]).
fn ends_past_every_live_in_sync_log(view: &VolumeView, member: &MemberRecord) -> bool {
    let Some(set) = &view.insync else {
        return false;
    };
    let mut live = view
        .members
        .values()
        .filter(|m| set.value.contains(&m.name) && m.volume_id == member.volume_id)
        .peekable();
    live.peek().is_some() && live.all(|m| m.head_epoch < member.head_epoch)
}

/// The in-sync set a promotion of `member` under `rule` must hear a member of vouch for it
/// (`promotion::vouched`): the set, when `member` is outside it under [`Rule::InSyncSet`];
/// none otherwise (a member of the set holds every acknowledged write already, and under
/// sync-quorum the promotion's read of a majority checks a member from outside it).
pub fn outside_the_set(view: &VolumeView, member: &str, rule: Rule) -> Vec<String> {
    match (&view.insync, rule) {
        (Some(set), Rule::InSyncSet) if !set.value.contains(member) => set.value.members.clone(),
        _ => Vec::new(),
    }
}

/// Better candidates first.
pub fn compare(a: &MemberRecord, b: &MemberRecord) -> Ordering {
    b.position()
        .cmp(&a.position())
        .then(b.priority.cmp(&a.priority))
        .then(a.name.cmp(&b.name))
}

/// The live members that may take over under `rule`, best first.
pub fn candidates(view: &VolumeView, rule: Rule) -> Vec<&MemberRecord> {
    let mut out: Vec<&MemberRecord> = view
        .members
        .values()
        .filter(|m| eligibility(view, m, rule).is_ok())
        .collect();
    out.sort_by(|a, b| compare(a, b));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Identity, InSync, MemberRole, Versioned};

    pub(crate) fn member(name: &str, head_epoch: u64, head: u64) -> MemberRecord {
        MemberRecord {
            name: name.into(),
            volume_id: "vol".into(),
            role: MemberRole::Replica,
            state: MemberState::Ready,
            epoch: head_epoch,
            head,
            head_epoch,
            committed: head,
            priority: 0,
            nofailover: false,
            replication: format!("{name}:1"),
            nbd: vec![],
            admin: None,
        }
    }

    fn view(members: Vec<MemberRecord>, insync: &[&str]) -> VolumeView {
        VolumeView {
            identity: Some(Identity {
                volume_id: "vol".into(),
                size: 1 << 20,
                created_by: "a".into(),
            }),
            insync: Some(Versioned {
                value: InSync {
                    epoch: 3,
                    leader: "a".into(),
                    members: insync.iter().map(|s| s.to_string()).collect(),
                },
                mod_revision: 1,
            }),
            members: members.into_iter().map(|m| (m.name.clone(), m)).collect(),
            ..VolumeView::default()
        }
    }

    fn names(v: &VolumeView) -> Vec<&str> {
        candidates(v, Rule::InSyncSet)
            .iter()
            .map(|m| m.name.as_str())
            .collect()
    }

    #[test]
    fn candidates_rank_by_lineage_then_priority_then_name() {
        let mut c = member("c", 3, 100);
        c.priority = 5;
        let v = view(
            vec![
                member("a", 2, 500),
                member("b", 3, 100),
                c,
                member("d", 3, 101),
            ],
            &["a", "b", "c", "d"],
        );
        // d has the longest log at the latest entry epoch; c's priority beats b at a tie;
        // a's longer log is of an older epoch, so it ranks last.
        assert_eq!(names(&v), ["d", "c", "b", "a"]);
        let v = view(vec![member("b", 3, 7), member("a", 3, 7)], &["a", "b"]);
        assert_eq!(names(&v), ["a", "b"], "equal positions fall to the name");
    }

    #[test]
    fn only_ready_in_sync_members_of_the_volume_may_take_over() {
        let mut rebuilding = member("r", 3, 900);
        rebuilding.state = MemberState::Rebuilding;
        let mut excluded = member("x", 3, 900);
        excluded.nofailover = true;
        let mut stranger = member("s", 3, 900);
        stranger.volume_id = "other".into();
        let v = view(
            vec![
                member("a", 3, 1),
                member("out", 3, 900),
                rebuilding,
                excluded,
                stranger,
            ],
            &["a", "r", "x", "s"],
        );
        assert_eq!(names(&v), ["a"]);
        let m = |n: &str| v.members.get(n).unwrap();
        assert_eq!(
            eligibility(&v, m("out"), Rule::InSyncSet),
            Err(Ineligible::NotInSync)
        );
        assert_eq!(
            eligibility(&v, m("r"), Rule::InSyncSet),
            Err(Ineligible::NotReady)
        );
        assert_eq!(
            eligibility(&v, m("x"), Rule::InSyncSet),
            Err(Ineligible::NoFailover)
        );
        assert_eq!(
            eligibility(&v, m("s"), Rule::InSyncSet),
            Err(Ineligible::OtherVolume)
        );
    }

    #[test]
    fn under_sync_quorum_the_most_complete_copy_may_lead_outside_the_in_sync_set() {
        // b dropped out of the set but holds a longer log than a, the only member in it: the
        // promotion would refuse a (b is more complete), so only b can ever serve.
        let v = view(vec![member("a", 3, 58), member("b", 3, 59)], &["a"]);
        let by = |rule| -> Vec<String> {
            candidates(&v, rule)
                .iter()
                .map(|m| m.name.clone())
                .collect()
        };
        assert_eq!(by(Rule::Majority), ["b", "a"]);
        assert_eq!(by(Rule::InSyncSet), ["a"]);
        // Without a live member of the set to hold a log of, nobody outside it may lead: a
        // survivor that lags would lose what the dead members of the set acknowledged.
        let alone = view(vec![member("b", 3, 59)], &["a"]);
        assert!(candidates(&alone, Rule::Majority).is_empty());
        let behind = view(vec![member("a", 3, 58), member("b", 3, 57)], &["a"]);
        assert_eq!(
            candidates(&behind, Rule::Majority)
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["a"],
            "a member outside the set that lacks the in-sync member's tail may not lead"
        );
        assert_eq!(Rule::for_commit("sync-quorum"), Rule::Majority);
        assert_eq!(Rule::for_commit("sync-all"), Rule::InSyncSet);
        assert_eq!(Rule::for_commit("best-effort"), Rule::InSyncSet);
        let mut never_led = view(vec![member("a", 0, 0), member("b", 0, 0)], &[]);
        never_led.insync = None;
        assert_eq!(
            candidates(&never_led, Rule::Majority)
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["a"],
            "a volume never led is still its creator's"
        );
    }

    #[test]
    fn a_member_outside_the_set_whose_log_ends_at_a_later_epoch_may_lead() {
        // b took entries from the primary of epoch 3 and dropped out of the set; a, the only
        // member in it, ends at epoch 2: the promotion refuses a while b answers.
        let v = view(vec![member("a", 2, 58), member("b", 3, 40)], &["a"]);
        assert_eq!(names(&v), ["b", "a"]);
        assert_eq!(outside_the_set(&v, "b", Rule::InSyncSet), ["a"]);
        assert!(outside_the_set(&v, "a", Rule::InSyncSet).is_empty());
        assert!(outside_the_set(&v, "b", Rule::Majority).is_empty());
        // At the same epoch a may hold acknowledged writes b lacks; with no live member of
        // the set, nothing says what was acknowledged.
        let same = view(vec![member("a", 3, 58), member("b", 3, 59)], &["a"]);
        assert_eq!(names(&same), ["a"]);
        let alone = view(vec![member("b", 3, 40)], &["a"]);
        assert!(names(&alone).is_empty());
    }

    #[test]
    fn a_volume_never_led_may_be_led_only_by_the_node_that_created_it() {
        let mut v = view(vec![member("a", 0, 0), member("b", 0, 0)], &[]);
        v.insync = None;
        assert_eq!(names(&v), ["a"]);
        v.identity = None;
        assert!(names(&v).is_empty());
    }
}
