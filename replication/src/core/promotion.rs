//! Whether a store may be promoted to primary: it must be able to recover the whole
//! committed prefix (the V2 candidate rule; see docs/PROTOCOL.md).

use blockrep_storage::{Epoch, Lsn};

use super::CommitMode;

/// What a store knows about itself, or reports when probed.
#[derive(Debug, Clone)]
pub struct Facts {
    pub name: String,
    /// Newest entry it can recover (after crash recovery, every entry in its log).
    pub head: Lsn,
    /// Epoch of the entry at `head`: two logs are compared by (head epoch, head), never by
    /// LSN alone, since an old primary's tail may be longer than the log that replaced it.
    pub head_epoch: Epoch,
    /// Highest LSN it knows to be committed.
    pub committed: Lsn,
    pub epoch: Epoch,
    pub needs_rebuild: bool,
    /// Its epoch is one it served at as primary (its own store is the epoch's owner), not one
    /// a primary fenced it at: everything acknowledged at that epoch is in its log, since a
    /// primary makes an entry durable before it acknowledges it. Known of the candidate
    /// itself only (a probe's answer does not say it): false for members.
    pub owns_epoch: bool,
}

/// Decides promotion of `candidate`, given the members that answered a probe out of
/// `configured` replicas (the candidate's own replica list), under `mode`. Returns the reason
/// for a refusal.
///
/// Invariant (*a promoted node holds the committed prefix*): no reachable member's log ends
/// at a later epoch than the candidate's (it followed a primary the candidate never did:
/// unless that epoch is the one the candidate served at itself), the candidate's log reaches
/// every LSN a reachable member whose log ends at the candidate's head epoch knows to be
/// committed, and under sync-quorum it is at least as complete, by (head epoch, head), as
/// every member of a set of `copies - copies / 2` copies, which meets every majority a
/// commit was made on and so, by quorum intersection, holds every committed entry even when
/// nobody has learnt the newest commit yet.
pub fn check(
    candidate: &Facts,
    members: &[Facts],
    configured: usize,
    mode: CommitMode,
) -> Result<(), String> {
    if crate::mutants::active(crate::mutants::Mutant::PromoteWithoutPrefix) {
        return Ok(());
    }
    if !next_epoch(candidate, members).can_be_followed() {
        // Replicas refuse the last epoch there is (nobody could ever take over from it), so
        // a promotion to it would fence everyone for nothing.
        return Err(format!(
            "no epoch that could still be followed is left above those seen by {} and its \
             members",
            candidate.name
        ));
    }
    if candidate.needs_rebuild {
        return Err(format!(
            "{} is waiting for a rebuild; its data is incomplete",
            candidate.name
        ));
    }
    // A member whose log ends at the epoch the candidate itself served at holds entries of
    // that epoch the candidate shipped; those it lost were never acknowledged.
    let served_by_candidate = |m: &Facts| candidate.owns_epoch && m.head_epoch == candidate.epoch;
    if let Some(m) = members
        .iter()
        .filter(|m| m.head_epoch > candidate.head_epoch && !served_by_candidate(m))
        .max_by_key(|m| m.head_epoch)
    {
        return Err(format!(
            "{} holds entries from epoch {}, but the log of {} ends at epoch {}: it missed a \
             later primary's writes",
            m.name, m.head_epoch, candidate.name, candidate.head_epoch
        ));
    }
    // Only a member whose log ends at the candidate's head epoch can know of a commit the
    // candidate lacks: the primary of that epoch was promoted holding everything committed
    // before it, and the candidate holds that primary's log up to its first entry. A
    // member's knowledge from an older epoch is of entries the newer one already holds, or,
    // where an earlier promotion lost writes (best-effort, forced, or two leaderships an
    // etcd restored from an older snapshot could not order), of a tail the newer epoch
    // replaced: refusing for it would refuse every node for good.
    let known = members
        .iter()
        .filter(|m| m.head_epoch == candidate.head_epoch)
        .map(|m| (m.committed, m.name.as_str()))
        .chain(std::iter::once((candidate.committed, "itself")))
        .max_by_key(|(c, _)| *c)
        .unwrap_or((Lsn::ZERO, "itself"));
    if candidate.head < known.0 {
        return Err(format!(
            "{} holds entries through {} but {} knows entries through {} are committed; \
             promoting it would lose acknowledged writes",
            candidate.name, candidate.head, known.1, known.0
        ));
    }
    if mode == CommitMode::SyncQuorum {
        // A commit is durable on copies / 2 + 1 copies, the primary's own among them
        // (commit.rs), so any copies - copies / 2 copies include one of those: with an even
        // count, half is enough (two copies: either one).
        let copies = configured + 1;
        let needed = copies - copies / 2;
        let reachable = members.len() + 1;
        if reachable < needed {
            return Err(format!(
                "only {reachable} of {copies} copies answered; {needed} are needed to meet \
                 every majority a commit was made on, and so to prove nothing committed is \
                 missing"
            ));
        }
        if let Some(m) = members
            .iter()
            .filter(|m| !m.needs_rebuild)
            .max_by_key(|m| (m.head_epoch, m.head))
            .filter(|m| (m.head_epoch, m.head) > (candidate.head_epoch, candidate.head))
        {
            return Err(format!(
                "{} holds entries through {}, more than {} ({}): promote the most complete copy",
                m.name, m.head, candidate.name, candidate.head
            ));
        }
    }
    Ok(())
}

/// For a candidate etcd elected from outside the in-sync set under sync-all or best-effort
/// because its log ends at a later epoch than that of every live member of the set
/// (`blockrep_control::rank`): whether one of the members it consulted, named in `in_sync`,
/// vouches for it. Returns the reason for a refusal.
///
/// Invariant (*a candidate from outside the in-sync set holds what a member of it holds*):
/// some consulted member of the set, not waiting for a rebuild, answered with a log that
/// ends at an epoch before the candidate's. That member holds every acknowledged write (the
/// leader removes a member from the set before it acknowledges anything that skips it), all
/// of them from epochs up to its own head epoch, so acknowledged before the primary of the
/// candidate's head epoch was promoted with every committed entry; the candidate's log
/// matched that primary's before it took that epoch's entries, so it holds them all. etcd's
/// records are only what the members last reported: this is checked on what they answer.
pub fn vouched(candidate: &Facts, members: &[Facts], in_sync: &[String]) -> Result<(), String> {
    if in_sync.is_empty()
        || members.iter().any(|m| {
            in_sync.contains(&m.name) && !m.needs_rebuild && m.head_epoch < candidate.head_epoch
        })
    {
        return Ok(());
    }
    Err(format!(
        "{} is outside the in-sync set, and no member of it ({}) answered with a log ending \
         before epoch {}: nothing shows it holds every acknowledged write",
        candidate.name,
        in_sync.join(", "),
        candidate.head_epoch
    ))
}

/// The lowest epoch a promotion may use: above everything the candidate and the members have
/// seen. It never wraps ([`Epoch::next`] saturates); [`check`] refuses a promotion when it
/// comes out as an epoch nobody could follow.
pub fn next_epoch(candidate: &Facts, members: &[Facts]) -> Epoch {
    members
        .iter()
        .map(|m| m.epoch)
        .chain(std::iter::once(candidate.epoch))
        .max()
        .unwrap_or(Epoch(0))
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, head: u64, committed: u64) -> Facts {
        Facts {
            name: name.into(),
            head: Lsn(head),
            head_epoch: Epoch(1),
            committed: Lsn(committed),
            epoch: Epoch(1),
            needs_rebuild: false,
            owns_epoch: false,
        }
    }

    #[test]
    fn a_member_at_the_epoch_the_candidate_served_at_does_not_hold_it_back() {
        // r1 served at epoch 2 and crashed before any entry of 2 was durable on it; r2 was
        // being rebuilt from it and holds one such entry, never acknowledged.
        let mut r1 = f("r1", 10, 10);
        r1.epoch = Epoch(2);
        let mut r2 = f("r2", 11, 10);
        r2.head_epoch = Epoch(2);
        r2.epoch = Epoch(2);
        r2.needs_rebuild = true;
        let err = check(&r1, &[r2.clone()], 2, CommitMode::SyncAll).unwrap_err();
        assert!(err.contains("missed a later primary's writes"), "{err}");
        r1.owns_epoch = true;
        check(&r1, &[r2.clone()], 2, CommitMode::SyncAll).expect("its own epoch's tail");
        // A later epoch than its own still does.
        r2.head_epoch = Epoch(3);
        assert!(check(&r1, &[r2], 2, CommitMode::SyncAll).is_err());
    }

    #[test]
    fn a_member_whose_log_ends_at_an_older_epoch_holds_no_commit_back() {
        // r2's knowledge is of epoch 1's entries; r1's log holds epoch 2's, whose primary
        // was promoted with everything committed before it (or replaced what it lost).
        let mut r1 = f("r1", 10, 10);
        r1.head_epoch = Epoch(2);
        r1.epoch = Epoch(2);
        check(&r1, &[f("r2", 12, 12)], 2, CommitMode::SyncAll).expect("promotable");
        // At the same head epoch it still does.
        let mut r2 = f("r2", 12, 12);
        r2.head_epoch = Epoch(2);
        let err = check(&r1, &[r2], 2, CommitMode::SyncAll).unwrap_err();
        assert!(err.contains("r2 knows entries through 12"), "{err}");
    }

    #[test]
    fn promotion_refuses_a_candidate_missing_the_committed_prefix() {
        let err = check(&f("r1", 5, 5), &[f("r2", 10, 8)], 2, CommitMode::SyncAll).unwrap_err();
        assert!(err.contains("r2 knows entries through 8"), "{err}");
        assert!(check(&f("r1", 8, 5), &[f("r2", 10, 8)], 2, CommitMode::SyncAll).is_ok());
    }

    #[test]
    fn promotion_refuses_a_rebuilding_candidate() {
        let mut c = f("r1", 10, 10);
        c.needs_rebuild = true;
        assert!(check(&c, &[], 2, CommitMode::SyncAll).is_err());
    }

    #[test]
    fn promotion_under_quorum_needs_a_majority_and_the_longest_log() {
        // 3 copies: the candidate plus one member is a majority.
        assert!(check(
            &f("r1", 10, 5),
            &[f("r2", 10, 5)],
            2,
            CommitMode::SyncQuorum
        )
        .is_ok());
        let err = check(&f("r1", 10, 5), &[], 2, CommitMode::SyncQuorum).unwrap_err();
        assert!(err.contains("copies answered"), "{err}");
        // 2 copies: every commit is on both, so the candidate alone is enough; 4 copies: a
        // commit is on 3, so 2 of them meet it.
        assert!(check(&f("r1", 10, 5), &[], 1, CommitMode::SyncQuorum).is_ok());
        assert!(check(
            &f("r1", 10, 5),
            &[f("r2", 10, 5)],
            3,
            CommitMode::SyncQuorum
        )
        .is_ok());
        assert!(check(&f("r1", 10, 5), &[], 3, CommitMode::SyncQuorum).is_err());
        // The newest commit (12) is not known by anyone, but r2's log holds it.
        let err = check(
            &f("r1", 10, 5),
            &[f("r2", 12, 5)],
            2,
            CommitMode::SyncQuorum,
        )
        .unwrap_err();
        assert!(err.contains("r2 holds entries through 12"), "{err}");
    }

    #[test]
    fn promotion_compares_logs_by_epoch_before_length() {
        // r1 is an old primary's long tail at epoch 1; r2 followed the primary of epoch 2.
        let mut r2 = f("r2", 8, 6);
        r2.head_epoch = Epoch(2);
        for mode in [
            CommitMode::SyncAll,
            CommitMode::SyncQuorum,
            CommitMode::BestEffort,
        ] {
            let err = check(&f("r1", 20, 5), &[r2.clone()], 2, mode).unwrap_err();
            assert!(err.contains("missed a later primary"), "{err}");
        }
        // The other way round, the shorter log at the later epoch is the one to promote.
        let mut c = f("r2", 8, 6);
        c.head_epoch = Epoch(2);
        assert!(check(&c, &[f("r1", 20, 5)], 2, CommitMode::SyncQuorum).is_ok());
    }

    #[test]
    fn promotion_refuses_when_no_followable_epoch_is_left() {
        let mut m = f("r2", 1, 1);
        m.epoch = Epoch(u64::MAX - 1);
        let refused = check(&f("r1", 1, 1), &[m.clone()], 1, CommitMode::SyncAll);
        assert!(refused.is_err_and(|e| e.contains("no epoch")));
        m.epoch = Epoch::MAX;
        assert_eq!(next_epoch(&f("r1", 1, 1), &[m.clone()]), Epoch::MAX);
        assert!(check(&f("r1", 1, 1), &[m], 1, CommitMode::SyncAll).is_err());
    }

    #[test]
    fn a_candidate_from_outside_the_in_sync_set_holds_what_a_member_of_it_holds() {
        let mut c = f("r1", 2, 0);
        c.head_epoch = Epoch(2);
        let set = ["r2".to_string(), "r3".to_string()];
        // In the set (nothing to vouch for), or vouched for by r2's log ending at epoch 1.
        assert!(vouched(&c, &[], &[]).is_ok());
        assert!(vouched(&c, &[f("r2", 9, 0)], &set).is_ok());
        // r4 is not in the set; r2 ends at the candidate's epoch and may hold more of it;
        // r3 is rebuilding; and an unanswered set vouches for nothing.
        let mut same = f("r2", 9, 0);
        same.head_epoch = Epoch(2);
        let mut rebuilding = f("r3", 1, 0);
        rebuilding.needs_rebuild = true;
        for members in [vec![f("r4", 1, 0)], vec![same], vec![rebuilding], vec![]] {
            let err = vouched(&c, &members, &set).unwrap_err();
            assert!(err.contains("outside the in-sync set"), "{err}");
        }
    }

    #[test]
    fn promotion_epoch_is_above_everything_seen() {
        let mut m = f("r2", 1, 1);
        m.epoch = Epoch(7);
        assert_eq!(next_epoch(&f("r1", 1, 1), &[m]), Epoch(8));
    }
}
