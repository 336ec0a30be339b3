//! The role worker: the task that owns a node's `NodeRuntime` and carries out the control
//! loop's role changes (follow, lead, member changes, step down, shut down) one at a time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use blockrep_control::Election;
use blockrep_replication::core::primary::PeerState;
use blockrep_replication::driver::primary::PrimaryHandle;
use blockrep_storage::Epoch;
use tokio::sync::{mpsc, oneshot};

use super::gate::AckGate;
use super::node::{NodeRuntime, RoleName};

/// The pause before a node that could not become a replica tries again.
const FOLLOW_RETRY: Duration = Duration::from_secs(1);

pub(super) enum RoleCommand {
    Follow,
    Lead {
        election: Election,
        gate: Arc<AckGate>,
    },
    SetReplicas(Vec<(String, String)>),
    StepDown,
    Shutdown(oneshot::Sender<()>),
}

/// The primary term the role worker has started, as the control loop sees it: only a term
/// that exists speaks for replication. A promotion that was refused leaves no term, so the
/// loop reports nothing in sync for it (it once reported "nobody but this node", and the
/// in-sync set recorded from that let the next campaign promote a lone survivor).
#[derive(Clone)]
pub(super) struct LedTerm {
    pub epoch: Epoch,
    /// The term's replication (None while it replicates to nobody).
    pub replication: Option<PrimaryHandle>,
}

/// Where the role worker leaves the term it runs (None while not primary).
pub(super) type TermSlot = Arc<Mutex<Option<LedTerm>>>;

/// The term in `slot` if it is the one at `epoch` (the worker may still be ending an
/// earlier term, or may have been refused this one).
pub(super) fn term_at(slot: &Mutex<Option<LedTerm>>, epoch: Epoch) -> Option<LedTerm> {
    let term = slot.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
    (term.epoch == epoch).then_some(term)
}

/// The replicas `term`'s replication counts in sync; None when there is no term to speak for
/// (`nobody_applied`: the worker was told to replicate to nobody, so a term without
/// replication counts nobody rather than not having caught up with its members yet).
pub(super) fn counted_in_sync(term: Option<LedTerm>, nobody_applied: bool) -> Option<Vec<String>> {
    let term = term?;
    let Some(replication) = term.replication else {
        return nobody_applied.then(Vec::new);
    };
    let status = replication.status();
    if status.epoch != term.epoch {
        return None;
    }
    let mut names: Vec<String> = status
        .peers
        .iter()
        .filter(|p| p.state == PeerState::InSync)
        .map(|p| p.id.0.clone())
        .collect();
    names.sort();
    Some(names)
}

/// Whether the node is still not a replica after `result`, saying so once (`failed_before`:
/// the last attempt had failed too).
fn still_not_following(result: Result<()>, failed_before: bool) -> bool {
    match result {
        Ok(()) => {
            if failed_before {
                tracing::info!("a replica now, after all");
            }
            false
        }
        Err(e) => {
            if !failed_before {
                tracing::error!(
                    "cannot become a replica: {e:#} (trying again every {FOLLOW_RETRY:?})"
                );
            }
            true
        }
    }
}

/// Carries out role changes one at a time, each to its end. A node that could not become a
/// replica (its `--listen` port taken) tries again every `FOLLOW_RETRY` until it can or is
/// told otherwise, saying so once.
pub(super) async fn role_worker(
    mut runtime: NodeRuntime,
    mut commands: mpsc::UnboundedReceiver<RoleCommand>,
    failed: mpsc::UnboundedSender<Epoch>,
    term: TermSlot,
) {
    let mut follow_failed = false;
    loop {
        let command = if follow_failed {
            tokio::select! {
                c = commands.recv() => c,
                _ = tokio::time::sleep(FOLLOW_RETRY) => Some(RoleCommand::Follow),
            }
        } else {
            commands.recv().await
        };
        let Some(command) = command else {
            return;
        };
        match command {
            RoleCommand::Follow => {
                follow_failed = still_not_following(runtime.follow().await, follow_failed);
            }
            RoleCommand::Lead { election, gate } => {
                follow_failed = false;
                let epoch = election.epoch;
                let led = runtime.lead(&election, gate);
                if let Err(e) = led.await {
                    tracing::error!("cannot lead at epoch {epoch}: {e:#}");
                    let _ = failed.send(epoch);
                    follow_failed = still_not_following(runtime.follow().await, false);
                }
            }
            RoleCommand::SetReplicas(replicas) => runtime.set_replicas(&replicas).await,
            RoleCommand::StepDown => {
                runtime.step_down().await;
                follow_failed = still_not_following(runtime.follow().await, false);
            }
            RoleCommand::Shutdown(done) => {
                runtime.shutdown().await;
                *term.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let _ = done.send(());
                return;
            }
        }
        let running = match runtime.role() {
            RoleName::Primary { epoch } => Some(LedTerm {
                epoch,
                replication: runtime.replication(),
            }),
            RoleName::Standby | RoleName::Replica => None,
        };
        *term.lock().unwrap_or_else(|p| p.into_inner()) = running;
        tracing::debug!(role = runtime.role().label(), "role applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_promotion_counts_nobody_in_sync() {
        // The worker was refused the term (or has not started it): no slot, or an old term.
        let slot = Mutex::new(None);
        assert_eq!(counted_in_sync(term_at(&slot, Epoch(7)), true), None);
        *slot.lock().unwrap() = Some(LedTerm {
            epoch: Epoch(6),
            replication: None,
        });
        assert_eq!(counted_in_sync(term_at(&slot, Epoch(7)), true), None);
    }

    #[test]
    fn a_term_without_replicas_counts_nobody_once_it_was_told_so() {
        let slot = Mutex::new(Some(LedTerm {
            epoch: Epoch(7),
            replication: None,
        }));
        assert_eq!(
            counted_in_sync(term_at(&slot, Epoch(7)), true),
            Some(vec![])
        );
        // Members were given and the worker has not started their replication yet.
        assert_eq!(counted_in_sync(term_at(&slot, Epoch(7)), false), None);
    }
}
