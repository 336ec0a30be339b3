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
use std::time::Instant;

use anyhow::{Context, Result};
use blockrep_frontend::{Exports, ListenAddr, Server, ServerError, Tls};
use blockrep_replication::core::{CommitMode, Millis, ReplicaId};
use blockrep_replication::driver::primary::PrimaryHandle;
use blockrep_replication::driver::replica::ReplicaStatus;
use blockrep_replication::driver::tls::PeerTls;
use blockrep_replication::driver::{self};
use blockrep_storage::{Epoch, StorageError, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::control::gate::{AckGate, OnLeaseLoss};
use crate::node::{begin_serving, promote, start_replication, Promote, ReplicationPlan};
use crate::observe::{NodeKind, StatusSource, VolumeMetrics};
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
    pub on_lease_loss: OnLeaseLoss,
    pub nbd_tls: Tls,
    pub peer_tls: Option<PeerTls>,
    pub nbd_memory_budget: u64,
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
    replication: Option<PrimaryHandle>,
}

/// A primary term's NBD server, cancelled and still giving its connections their grace: the
/// NBD port is free again only once it has ended.
struct Draining {
    server: JoinHandle<Result<(), ServerError>>,
    replication: Option<PrimaryHandle>,
}

/// The store and the one role the node runs. Role changes are serial (`&mut self`); the
/// gate of the running term is also published in [`NodeRuntime::gate_slot`], so the
/// controller loop can close it at once, without waiting for a role change to finish.
pub struct NodeRuntime {
    settings: NodeSettings,
    store: Arc<Store>,
    metrics: Arc<VolumeMetrics>,
    origin: Instant,
    running: Running,
    draining: Option<Draining>,
    gate: Arc<GateSlot>,
    status: Arc<Mutex<Arc<StatusSource>>>,
}

/// The gate of the current primary term, if any, shared with the controller loop.
#[derive(Default)]
pub struct GateSlot {
    current: Mutex<Option<Arc<AckGate>>>,
}

impl GateSlot {
    fn set(&self, gate: Option<Arc<AckGate>>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = gate;
    }

    pub fn get(&self) -> Option<Arc<AckGate>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Publishes the controller's lease deadline to the running term.
    pub fn publish(&self, deadline: Option<Millis>) {
        if let Some(g) = self.get() {
            g.set_deadline(deadline);
        }
    }

    /// Ends the running term's acknowledgements now; the role change follows.
    pub fn fence(&self) {
        if let Some(g) = self.get() {
            g.close();
        }
    }
}

impl NodeRuntime {
    /// A node in `Standby` on an open store. `origin` is the clock the controller loop
    /// uses, so the gate's deadlines mean the same instants.
    pub fn new(
        settings: NodeSettings,
        store: Arc<Store>,
        metrics: Arc<VolumeMetrics>,
        origin: Instant,
    ) -> NodeRuntime {
        let status = Arc::new(Mutex::new(standby_status(&store, &metrics)));
        NodeRuntime {
            settings,
            store,
            metrics,
            origin,
            running: Running::Standby,
            draining: None,
            gate: Arc::new(GateSlot::default()),
            status,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The running term's gate, for the controller loop.
    pub fn gate_slot(&self) -> Arc<GateSlot> {
        self.gate.clone()
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
            Running::Primary(p) => p.replication.clone(),
            _ => None,
        }
    }

    /// Whether a role that ended by itself (a failed replica driver, a failed NBD server)
    /// left the node doing nothing; the caller then asks for a role again.
    pub fn role_ended(&self) -> bool {
        match &self.running {
            Running::Standby => false,
            Running::Replica(r) => r.task.is_finished(),
            Running::Primary(p) => p.server.is_finished(),
        }
    }

    /// Stops whatever runs and serves nothing.
    pub async fn standby(&mut self) {
        self.stop_role().await;
        self.set_status(standby_status(&self.store, &self.metrics));
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
    /// (name, replication address), acknowledging until `deadline` and then as the
    /// controller loop publishes. On failure the node is left in `Standby`.
    pub async fn lead(
        &mut self,
        epoch: Epoch,
        replicas: &[(String, String)],
        force: bool,
        deadline: Option<Millis>,
    ) -> Result<()> {
        self.stop_role().await;
        let replicas: Vec<(ReplicaId, String)> = replicas
            .iter()
            .map(|(n, a)| (ReplicaId(n.clone()), a.clone()))
            .collect();
        let started = self.start_primary(epoch, &replicas, force, deadline).await;
        match started {
            Ok(role) => {
                tracing::info!(
                    node = %self.settings.name,
                    "primary at epoch {}, replicating to {} member(s)",
                    role.epoch,
                    replicas.len()
                );
                self.gate.set(Some(role.gate.clone()));
                self.set_status(Arc::new(StatusSource::new(
                    self.store.clone(),
                    self.metrics.clone(),
                    NodeKind::Primary {
                        mode: self.settings.mode,
                        replication: role.replication.clone(),
                    },
                )));
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
        epoch: Epoch,
        replicas: &[(ReplicaId, String)],
        force: bool,
        deadline: Option<Millis>,
    ) -> Result<PrimaryRole> {
        let s = &self.settings;
        let mode = s.mode;
        let asked = Promote {
            candidate: s.name.clone(),
            replicas,
            mode,
            epoch: Some(epoch),
            force,
        };
        let epoch = promote(&self.store, &asked, s.peer_tls.clone()).await?;
        // The previous term's server must have let go of the NBD port.
        self.finish_draining().await;
        let s = &self.settings;
        let server = Server::bind(&s.nbd)
            .await?
            .tls(s.nbd_tls.clone())
            .memory_budget(s.nbd_memory_budget);
        let epoch = begin_serving(&self.store, epoch, mode).await?;
        let stop = CancellationToken::new();
        let replication = if replicas.is_empty() {
            None
        } else {
            let plan = ReplicationPlan {
                replicas,
                barrier_timeout_ms: s.barrier_timeout_ms,
                rebuild_rate: s.rebuild_rate,
            };
            let peer = s.peer_tls.clone();
            Some(start_replication(&self.store, &plan, mode, epoch, peer, stop.clone()).await?)
        };
        let gate = Arc::new(AckGate::new(self.origin, s.on_lease_loss));
        gate.set_deadline(deadline);
        let volume = StoreVolume::new(
            self.store.clone(),
            replication.clone(),
            self.metrics.clone(),
            mode.name(),
        )
        .with_gate(gate.clone());
        let mut exports = Exports::new();
        exports.add(s.export.clone(), Arc::new(volume));
        let server = server.observe(self.metrics.clone());
        let task = tokio::spawn(server.run(exports, stop.clone()));
        Ok(PrimaryRole {
            epoch,
            gate,
            stop,
            server: task,
            replication,
        })
    }

    /// Stops acknowledging at once and ends the running role; a primary's NBD connections
    /// are dropped once their grace is over (they get no answer meanwhile: the gate is
    /// closed), without holding up the caller.
    pub async fn step_down(&mut self) {
        self.gate.fence();
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
                self.gate.set(None);
                p.stop.cancel();
                self.draining = Some(Draining {
                    server: p.server,
                    replication: p.replication,
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
