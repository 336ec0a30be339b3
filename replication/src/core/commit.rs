//! The commit rule: the highest LSN a commit mode considers durable.

use blockrep_storage::Lsn;

use super::CommitMode;

/// One replica as the rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct Vote {
    /// Only in-sync replicas count; a catching-up or rebuilding one never does.
    pub in_sync: bool,
    /// Durable on that replica (reported after its own fsync; never "received").
    pub durable: Lsn,
}

/// The highest LSN that meets `mode`, given the primary's own durable LSN and its replicas.
///
/// Invariant (*commit counts only durable, in-sync copies*): a replica contributes only
/// through a durable LSN it reported after fsync, and only while in sync. `sync-all` with a
/// replica out of sync commits nothing new: it never silently downgrades.
///
/// Invariant (*the local fsync gates every mode*): nothing is committed beyond the primary's
/// own durable LSN, in `sync-quorum` too. A quorum of replicas without the primary is not
/// enough: a primary that restarts after losing its unsynced tail would otherwise serve, and
/// overwrite, entries the cluster had already committed.
pub fn committed(mode: CommitMode, local_durable: Lsn, replicas: &[Vote]) -> Lsn {
    committed_now(mode, local_durable, replicas).unwrap_or(Lsn::ZERO)
}

/// What the copies in sync *now* make durable under `mode`, or `None` when the mode cannot be
/// met at all (sync-all with a replica out of sync, sync-quorum without a majority in sync).
///
/// Invariant (*a barrier is answered by the copies in sync now*): a FLUSH completes only when
/// this is `Some(c)` with `c` at or past its target. The committed LSN is a high-water mark
/// of what was durable once; a replica that fell into a rebuild since then no longer holds it
/// reliably, so "target <= committed" alone would let sync-all answer a FLUSH with a replica
/// missing (found by the simulator, seed 345162: a FLUSH through LSN 0, right after a
/// promotion, answered while both replicas were still connecting and one was mid-rebuild).
pub fn committed_now(mode: CommitMode, local_durable: Lsn, replicas: &[Vote]) -> Option<Lsn> {
    use crate::mutants::{active, Mutant};
    let counted: Vec<Vote>;
    let replicas = if active(Mutant::CountOutOfSyncReplica) {
        counted = replicas
            .iter()
            .map(|v| Vote {
                in_sync: true,
                ..*v
            })
            .collect();
        &counted[..]
    } else {
        replicas
    };
    match mode {
        CommitMode::BestEffort => Some(local_durable),
        CommitMode::SyncAll => {
            if replicas.is_empty() || replicas.iter().any(|r| !r.in_sync) {
                return None;
            }
            Some(
                replicas
                    .iter()
                    .map(|r| r.durable)
                    .fold(local_durable, Lsn::min),
            )
        }
        CommitMode::SyncQuorum => {
            // The primary is always one of the majority: its own fsync gates the rule.
            let copies = replicas.len() + 1;
            let needed = copies / 2;
            let mut durable: Vec<Lsn> = replicas
                .iter()
                .filter(|r| r.in_sync)
                .map(|r| r.durable)
                .collect();
            if durable.len() < needed {
                return None;
            }
            durable.sort_unstable_by(|a, b| b.cmp(a));
            // The needed-th highest replica LSN is durable on that many replicas.
            let replicated = needed.checked_sub(1).map_or(local_durable, |k| durable[k]);
            Some(replicated.min(local_durable))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(in_sync: bool, d: u64) -> Vote {
        Vote {
            in_sync,
            durable: Lsn(d),
        }
    }

    #[test]
    fn commit_sync_all_needs_every_replica_in_sync() {
        let m = CommitMode::SyncAll;
        assert_eq!(committed(m, Lsn(10), &[v(true, 8), v(true, 9)]), Lsn(8));
        assert_eq!(committed(m, Lsn(5), &[v(true, 8), v(true, 9)]), Lsn(5));
        assert_eq!(
            committed(m, Lsn(10), &[v(true, 10), v(false, 10)]),
            Lsn::ZERO
        );
        assert_eq!(committed(m, Lsn(10), &[]), Lsn::ZERO, "never vacuous");
    }

    #[test]
    fn commit_sync_quorum_takes_the_majority_value() {
        let m = CommitMode::SyncQuorum;
        // 3 copies, majority 2.
        assert_eq!(committed(m, Lsn(10), &[v(true, 7), v(false, 9)]), Lsn(7));
        assert_eq!(committed(m, Lsn(10), &[v(true, 12), v(true, 3)]), Lsn(10));
        assert_eq!(
            committed(m, Lsn(10), &[v(false, 12), v(false, 12)]),
            Lsn::ZERO
        );
        // 5 copies, majority 3: catching-up replicas with a high LSN do not count.
        assert_eq!(
            committed(
                m,
                Lsn(10),
                &[v(true, 9), v(true, 4), v(false, 10), v(false, 10)]
            ),
            Lsn(4)
        );
        assert_eq!(
            committed(
                m,
                Lsn(10),
                &[v(true, 9), v(false, 10), v(false, 10), v(false, 10)]
            ),
            Lsn::ZERO
        );
        assert_eq!(
            committed(
                m,
                Lsn(10),
                &[v(true, 9), v(true, 4), v(true, 6), v(false, 10)]
            ),
            Lsn(6)
        );
    }

    #[test]
    fn commit_local_fsync_gates_quorum() {
        let m = CommitMode::SyncQuorum;
        // Both replicas are ahead of the primary's own fsync: the primary's LSN bounds it.
        assert_eq!(committed(m, Lsn(5), &[v(true, 12), v(true, 12)]), Lsn(5));
        assert_eq!(
            committed(m, Lsn::ZERO, &[v(true, 12), v(true, 12)]),
            Lsn::ZERO
        );
        for mode in [CommitMode::SyncAll, CommitMode::BestEffort] {
            assert_eq!(committed(mode, Lsn(5), &[v(true, 12), v(true, 12)]), Lsn(5));
        }
    }

    #[test]
    fn commit_best_effort_is_local() {
        assert_eq!(
            committed(CommitMode::BestEffort, Lsn(4), &[v(false, 0)]),
            Lsn(4)
        );
    }
}
