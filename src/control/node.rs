//! One node of an etcd-led volume: its store, and exactly one role at a time.
//!
//! [`NodeRuntime`] carries out what the controller decides: `Standby` (no NBD listener at
//! all, so a client that tries each node's address in turn is refused here and lands on the
//! primary), `Replica` (the replication driver on `--listen`), `Primary` (promotion at the
//! epoch etcd handed out, replication to the other members, NBD behind an [`AckGate`]).
//!
//! The store stays open across roles: both replication drivers set what they need on it
//! when they start (checkpoint gate, retention pin), exactly as they do on a store that a
//! process has just opened, and reopening would need every task that holds it to be gone
//! first (the store's flock is per open file, so a second open in-process would be refused).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use blockrep_control::Election;
use blockrep_frontend::{Exports, ListenAddr, Server, ServerError, Tls};
use blockrep_replication::core::{CommitMode, ReplicaId};
use blockrep_replication::driver::primary::PrimaryHandle;
use blockrep_replication::driver::replica::ReplicaStatus;
use blockrep_replication::driver::tls::PeerTls;
use blockrep_replication::driver::{self};
use blockrep_storage::{Epoch, StorageError, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::control::gate::AckGate;
use crate::observe::{NodeKind, StatusSource, VolumeMetrics};
use crate::primary::{
    begin_serving, promote, spawn_replication, start_replication, Promote, ReplicationPlan,
};
use crate::volume::ReplicationSlot;
use crate::volume::StoreVolume;

/// What a node needs to take any of its roles.
#[derive(Clone)]
pub struct NodeSettings {
    /// The node's name in etcd and the name its peers' certificates carry.
    pub name: String,
    pub nbd: Vec<ListenAddr>,
    pub export: String,
    /// Where the primary's replication connects while this node is a replica.
    pub listen: String,
    pub mode: CommitMode,
    pub barrier_timeout_ms: u64,
    pub rebuild_rate: u64,
    /// See `ReplicationPlan::confirm_interval_ms` (0 unless `--failsafe`).
    pub confirm_interval_ms: u64,
    pub nbd_tls: Tls,
    pub peer_tls: Option<PeerTls>,
    pub nbd_memory_budget: u64,
}

impl NodeSettings {
    /// How this node's primary replicates to `replicas`.
    fn replication_plan<'a>(&self, replicas: &'a [(ReplicaId, String)]) -> ReplicationPlan<'a> {
        ReplicationPlan {
            replicas,
            barrier_timeout_ms: self.barrier_timeout_ms,
            rebuild_rate: self.rebuild_rate,
            confirm_interval_ms: self.confirm_interval_ms,
        }
    }
}

/// The role a node is in, as the outside sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleName {
    Standby,
    Replica,
    Primary { epoch: Epoch },
}

impl RoleName {
    pub fn label(self) -> &'static str {
        match self {
            RoleName::Standby => "standby",
            RoleName::Replica => "replica",
            RoleName::Primary { .. } => "primary",
        }
    }
}

/// How long a stepped-down primary's NBD connections stay up. Every way a term ends closes
/// its gate before the server is told to stop, so no request still waiting is ever answered;
/// the grace only lets a reply already past the gate go out, and then the clients are
/// dropped, to reconnect to the next leader (with the server's 5 s default they waited that
/// long behind a closed gate: 7 s from a cut to the first FLUSH on the new leader, not 3).
const STEP_DOWN_GRACE: Duration = Duration::from_millis(250);

enum Running {
    Standby,
    Replica(ReplicaRole),
    Primary(PrimaryRole),
}

struct ReplicaRole {
    stop: CancellationToken,
    task: JoinHandle<Result<(), StorageError>>,
}

struct PrimaryRole {
    epoch: Epoch,
    gate: Arc<AckGate>,
    stop: CancellationToken,
    server: JoinHandle<Result<(), ServerError>>,
    /// The replication the volume's barriers go through, replaced when the members change.
    replication: ReplicationSlot,
    /// Each replication driver has its own token, so one can be replaced alone.
    replication_stop: CancellationToken,
    replicas: Vec<(ReplicaId, String)>,
}

/// A primary term's NBD server, cancelled and still giving its connections their grace: the
/// NBD port is free again only once it has ended.
struct Draining {
    server: JoinHandle<Result<(), ServerError>>,
    replication: Option<PrimaryHandle>,
}

/// The store and the one role the node runs. Role changes are serial (`&mut self`). A
/// primary term's [`AckGate`] comes from the caller, which keeps it: the controller loop
/// closes it the moment it decides to step down, without waiting for a role change.
pub struct NodeRuntime {
    settings: NodeSettings,
    store: Arc<Store>,
    metrics: Arc<VolumeMetrics>,
    running: Running,
    draining: Option<Draining>,
    status: Arc<Mutex<Arc<StatusSource>>>,
}

impl NodeRuntime {
    /// A node in `Standby` on an open store.
    pub fn new(
        settings: NodeSettings,
        store: Arc<Store>,
        metrics: Arc<VolumeMetrics>,
    ) -> NodeRuntime {
        let status = Arc::new(Mutex::new(standby_status(&store, &metrics)));
        NodeRuntime {
            settings,
            store,
            metrics,
            running: Running::Standby,
            draining: None,
            status,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// What the admin endpoint reports from: the running role's status source.
    pub fn status_slot(&self) -> Arc<Mutex<Arc<StatusSource>>> {
        self.status.clone()
    }

    pub fn role(&self) -> RoleName {
        match &self.running {
            Running::Standby => RoleName::Standby,
            Running::Replica(_) => RoleName::Replica,
            Running::Primary(p) => RoleName::Primary { epoch: p.epoch },
        }
    }

    /// The primary term's replication, if this node leads with replicas.
    pub fn replication(&self) -> Option<PrimaryHandle> {
        match &self.running {
            Running::Primary(p) => p
                .replication
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            _ => None,
        }
    }

    /// Becomes a replica, listening on `--listen` for whoever leads (a replica already is).
    pub async fn follow(&mut self) -> Result<()> {
        if let Running::Replica(r) = &self.running {
            if !r.task.is_finished() {
                return Ok(());
            }
        }
        self.stop_role().await;
        let listen = &self.settings.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let (status_tx, status_rx) = watch::channel(ReplicaStatus::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(driver::replica::serve(
            self.store.clone(),
            listener,
            stop.clone(),
            Some(status_tx),
            self.settings.peer_tls.clone(),
        ));
        self.set_status(Arc::new(StatusSource::new(
            self.store.clone(),
            self.metrics.clone(),
            NodeKind::Replica { status: status_rx },
        )));
        self.running = Running::Replica(ReplicaRole { stop, task });
        tracing::info!(node = %self.settings.name, "replica: listening on {listen}");
        Ok(())
    }

    /// Becomes primary at `epoch` (already taken in etcd), replicating to `replicas`
    /// (name, replication address), acknowledging while `gate` holds; a sync-quorum
    /// promotion hears from a majority of at least `copies` copies, and from a member of
    /// `vouchers` vouching for this store when etcd elected it from outside the in-sync set.
    /// On failure the node is left in `Standby`.
    pub async fn lead(&mut self, election: &Election, gate: Arc<AckGate>) -> Result<()> {
        self.stop_role().await;
        let started = self.start_primary(election, gate).await;
        match started {
            Ok(role) => {
                tracing::info!(
                    node = %self.settings.name,
                    "primary at epoch {}, replicating to {} member(s)",
                    role.epoch,
                    role.replicas.len()
                );
                let replication = role
                    .replication
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                self.set_primary_status(replication);
                self.running = Running::Primary(role);
                Ok(())
            }
            Err(e) => {
                self.set_status(standby_status(&self.store, &self.metrics));
                Err(e)
            }
        }
    }

    async fn start_primary(
        &mut self,
        election: &Election,
        gate: Arc<AckGate>,
    ) -> Result<PrimaryRole> {
        let replicas = replica_ids(&election.replicas);
        let s = &self.settings;
        let mode = s.mode;
        let asked = Promote {
            candidate: s.name.clone(),
            replicas: &replicas,
            copies: election.copies,
            mode,
            epoch: Some(election.epoch),
            force: election.force,
            vouchers: &election.vouchers,
            elected: true,
        };
        let epoch = promote(&self.store, &asked, s.peer_tls.clone()).await?;
        // A failsafe term's hold counts from here: this node stopped answering the previous
        // primary before the promotion, and the members it fenced answer it no more, so
        // under either sync mode the previous primary's last confirmation is behind us.
        gate.start_hold();
        // The previous term's server must have let go of the NBD port.
        self.finish_draining().await;
        let s = &self.settings;
        let server = Server::bind(&s.nbd)
            .await?
            .tls(s.nbd_tls.clone())
            .memory_budget(s.nbd_memory_budget)
            .shutdown_grace(STEP_DOWN_GRACE);
        let epoch = begin_serving(&self.store, epoch, mode).await?;
        let stop = CancellationToken::new();
        let replication_stop = stop.child_token();
        let replication = self
            .replicate(epoch, &replicas, replication_stop.clone())
            .await?;
        let volume = StoreVolume::new(
            self.store.clone(),
            replication,
            self.metrics.clone(),
            mode.name(),
        )
        .with_gate(gate.clone());
        let slot = volume.replication_slot();
        let mut exports = Exports::new();
        exports.add(self.settings.export.clone(), Arc::new(volume));
        let server = server.observe(self.metrics.clone());
        let task = tokio::spawn(server.run(exports, stop.clone()));
        Ok(PrimaryRole {
            epoch,
            gate,
            stop,
            server: task,
            replication: slot,
            replication_stop,
            replicas,
        })
    }

    /// A replication driver at `epoch` to `replicas` (none without replicas).
    async fn replicate(
        &self,
        epoch: Epoch,
        replicas: &[(ReplicaId, String)],
        stop: CancellationToken,
    ) -> Result<Option<PrimaryHandle>> {
        if replicas.is_empty() {
            return Ok(None);
        }
        let s = &self.settings;
        let plan = s.replication_plan(replicas);
        let peer = s.peer_tls.clone();
        let handle = start_replication(&self.store, &plan, s.mode, epoch, peer, stop).await?;
        Ok(Some(handle))
    }

    /// As primary: replicates to `replicas` from now on. The caller orders it: a replica
    /// leaves the set only once etcd's in-sync set no longer names it (the next primary
    /// could otherwise be one that lacks what this one acknowledged without it). Members
    /// change inside the running driver; only the last replica leaving (or the first
    /// joining) stops (or starts) one, and a FLUSH in flight on a stopped driver fails (it
    /// was not acknowledged) and the client retries it.
    pub async fn set_replicas(&mut self, replicas: &[(String, String)]) {
        let replicas = replica_ids(replicas);
        let s = &self.settings;
        let Running::Primary(p) = &mut self.running else {
            return;
        };
        if p.replicas == replicas {
            return;
        }
        tracing::info!(
            node = %s.name,
            "replicating to {} now (was {})",
            names(&replicas),
            names(&p.replicas)
        );
        let current = p
            .replication
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let (Some(driver), false) = (&current, replicas.is_empty()) {
            // In place: the members that stay keep their sessions and no FLUSH in flight
            // is disturbed.
            driver.set_replicas(replicas.clone());
            p.replicas = replicas;
            return;
        }
        // From no replica to some, or from some to none: a driver starts or stops.
        let stop = p.stop.child_token();
        let handle = (!replicas.is_empty()).then(|| {
            let plan = s.replication_plan(&replicas);
            spawn_replication(
                &self.store,
                &plan,
                s.mode,
                p.epoch,
                s.peer_tls.clone(),
                stop.clone(),
            )
        });
        *p.replication.write().unwrap_or_else(|e| e.into_inner()) = handle.clone();
        p.replication_stop.cancel();
        p.replication_stop = stop;
        p.replicas = replicas;
        if let Some(old) = current {
            old.stopped().await;
        }
        self.set_primary_status(handle);
    }

    /// The replicas the running primary replicates to.
    #[cfg(test)]
    pub fn replicas(&self) -> Vec<String> {
        match &self.running {
            Running::Primary(p) => p.replicas.iter().map(|(id, _)| id.0.clone()).collect(),
            _ => Vec::new(),
        }
    }

    fn set_primary_status(&self, replication: Option<PrimaryHandle>) {
        self.set_status(Arc::new(StatusSource::new(
            self.store.clone(),
            self.metrics.clone(),
            NodeKind::Primary {
                mode: self.settings.mode,
                replication,
            },
        )));
    }

    /// Stops acknowledging at once and ends the running role; a primary's NBD connections
    /// are dropped once their grace is over (they get no answer meanwhile: the gate is
    /// closed), without holding up the caller.
    pub async fn step_down(&mut self) {
        self.stop_role().await;
        self.set_status(standby_status(&self.store, &self.metrics));
    }

    async fn stop_role(&mut self) {
        match std::mem::replace(&mut self.running, Running::Standby) {
            Running::Standby => {}
            Running::Replica(r) => {
                r.stop.cancel();
                match r.task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("the replica role ended with: {e}"),
                    Err(e) => tracing::warn!("the replica role's task failed: {e}"),
                }
            }
            Running::Primary(p) => {
                p.gate.close();
                p.stop.cancel();
                let replication = p
                    .replication
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                self.draining = Some(Draining {
                    server: p.server,
                    replication,
                });
            }
        }
    }

    /// Waits until the last primary term's NBD server and replication have ended.
    async fn finish_draining(&mut self) {
        let Some(d) = self.draining.take() else {
            return;
        };
        match d.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the NBD server ended with: {e}"),
            Err(e) => tracing::warn!("the NBD server's task failed: {e}"),
        }
        if let Some(r) = d.replication {
            r.stopped().await;
        }
    }

    /// Ends every role and waits for all of it to stop (for a clean exit).
    pub async fn shutdown(&mut self) {
        self.step_down().await;
        self.finish_draining().await;
    }

    fn set_status(&self, source: Arc<StatusSource>) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = source;
    }
}

fn replica_ids(replicas: &[(String, String)]) -> Vec<(ReplicaId, String)> {
    replicas
        .iter()
        .map(|(n, a)| (ReplicaId(n.clone()), a.clone()))
        .collect()
}

fn names(replicas: &[(ReplicaId, String)]) -> String {
    if replicas.is_empty() {
        return "no replica".into();
    }
    replicas
        .iter()
        .map(|(id, _)| id.0.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A standby reports like a replica that nobody is connected to.
fn standby_status(store: &Arc<Store>, metrics: &Arc<VolumeMetrics>) -> Arc<StatusSource> {
    let (_, status) = watch::channel(ReplicaStatus::default());
    Arc::new(StatusSource::new(
        store.clone(),
        metrics.clone(),
        NodeKind::Replica { status },
    ))
}

#[cfg(test)]
mod tests;
