//! The role worker: the task that owns a node's `NodeRuntime` and carries out the control
//! loop's role changes (follow, lead, member changes, step down, shut down) one at a time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use blockrep_control::Election;
use blockrep_replication::driver::primary::PrimaryHandle;
use blockrep_storage::Epoch;
use tokio::sync::{mpsc, oneshot};

use super::gate::AckGate;
use super::node::NodeRuntime;

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
    primary: Arc<Mutex<Option<PrimaryHandle>>>,
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
                *primary.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let _ = done.send(());
                return;
            }
        }
        *primary.lock().unwrap_or_else(|p| p.into_inner()) = runtime.replication();
        tracing::debug!(role = runtime.role().label(), "role applied");
    }
}
