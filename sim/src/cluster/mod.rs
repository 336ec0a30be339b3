//! A simulated cluster: nodes running the real primary and replica cores over the simulated
//! network and stores, a client, a coordinator that injects faults and fails over, and the
//! checker (see `check`).
//!
//! This module owns the `Cluster` and the client's side; the rest is split by concern:
//! `events` (the event queue and what each event does), `execution` (stepping a core and
//! performing its actions), `faults`, `coordinator` (failover and promotion), `liveness`
//! (the convergence phase) and `script` (hand-placed scenarios).

mod control;
mod coordinator;
mod events;
mod execution;
mod faults;
mod liveness;
mod queue;
mod script;

use std::collections::HashMap;

use blockrep_replication::core::primary::{self, PrimaryConfig, PrimaryCore};
use blockrep_replication::core::replica::{ReplicaCore, ReplicaState};
use blockrep_replication::core::{CommitMode, ReplicaId};
use blockrep_storage::{Epoch, Lsn, VolumeId};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::check::{Checker, Violation};
use crate::net::{ConnKey, Network, NodeId};
use crate::node::{PrimaryNode, Role, SimNode};
use crate::store::{Entry, SimStore, StoreRole, BLOCK, EPOCH_START};

use queue::{Ev, EventQueue, Job};

pub use control::{ControlConfig, ControlFaults};

/// Fault rates, per step of the client (a step is one write or flush).
#[derive(Debug, Clone)]
pub struct Faults {
    pub max_delay: u64,
    pub reset: f64,
    pub crash: f64,
    pub partition: f64,
    pub heal: f64,
    pub failover: f64,
    pub restart: f64,
    /// A gated checkpoint goes ahead of its gate (the WAL filled up while it waited).
    pub gate_overrun: f64,
    /// A node's filesystem fills: as a replica it refuses entries and base data for lack of
    /// space (`StoreRefused`) until `free` empties every filesystem again. Off in the default
    /// mixes (they keep their histories); `sim/tests/full_disks.rs` turns it on.
    pub fill: f64,
    pub free: f64,
}

impl Faults {
    pub fn none() -> Faults {
        Faults {
            max_delay: 2,
            reset: 0.0,
            crash: 0.0,
            partition: 0.0,
            heal: 1.0,
            failover: 0.0,
            restart: 1.0,
            gate_overrun: 0.0,
            fill: 0.0,
            free: 0.0,
        }
    }

    pub fn all() -> Faults {
        Faults {
            max_delay: 20,
            reset: 0.01,
            crash: 0.004,
            partition: 0.004,
            heal: 0.02,
            failover: 0.003,
            restart: 0.02,
            gate_overrun: 0.05,
            fill: 0.0,
            free: 0.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub nodes: usize,
    pub mode: CommitMode,
    /// Blocks in the volume (small, so writes overwrite each other).
    pub blocks: u64,
    /// Client steps before the liveness phase.
    pub steps: usize,
    pub faults: Faults,
    /// Entries the WAL may hold for a lagging replica (the retention budget, in blocks).
    pub retention_entries: u64,
    /// The etcd-led mode: etcd (in memory) and one control-plane core per node decide who
    /// leads; `None`, the coordinator does.
    pub control: Option<ControlConfig>,
}

impl Config {
    pub fn new(seed: u64, mode: CommitMode) -> Config {
        Config {
            seed,
            nodes: 3,
            mode,
            blocks: 64,
            steps: 400,
            faults: Faults::all(),
            retention_entries: 200,
            control: None,
        }
    }
}

/// Counters for the summary.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub writes: u64,
    pub flushes_ok: u64,
    pub flushes_failed: u64,
    pub crashes: u64,
    pub resets: u64,
    pub partitions: u64,
    pub failovers: u64,
    pub refused_promotions: u64,
    /// Entries or base chunks a replica refused because its filesystem was full.
    pub refused_for_space: u64,
    pub catch_ups: u64,
    /// Replica logs cut back to the primary's instead of being rebuilt.
    pub truncations: u64,
    pub rebuilds: u64,
    pub checks: u64,
    /// Failovers the liveness phase's operator forced (etcd-led mode: no leader served).
    pub forced_failovers: u64,
    /// The etcd-led mode's faults and checks.
    pub etcd_cuts: u64,
    pub etcd_outages: u64,
    pub etcd_restores: u64,
    pub pauses: u64,
    /// Acknowledgements (writes, FLUSHes, reads) the lease-safety checker checked.
    pub lease_checked: u64,
}

impl Stats {
    /// Adds another history's counters to these.
    pub fn add(&mut self, s: &Stats) {
        self.writes += s.writes;
        self.flushes_ok += s.flushes_ok;
        self.flushes_failed += s.flushes_failed;
        self.crashes += s.crashes;
        self.resets += s.resets;
        self.partitions += s.partitions;
        self.failovers += s.failovers;
        self.refused_promotions += s.refused_promotions;
        self.catch_ups += s.catch_ups;
        self.truncations += s.truncations;
        self.rebuilds += s.rebuilds;
        self.checks += s.checks;
        self.forced_failovers += s.forced_failovers;
        self.etcd_cuts += s.etcd_cuts;
        self.etcd_outages += s.etcd_outages;
        self.etcd_restores += s.etcd_restores;
        self.pauses += s.pauses;
        self.lease_checked += s.lease_checked;
    }
}

/// How a FLUSH ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushOutcome {
    Acked,
    Failed(String),
}

pub struct Cluster {
    pub cfg: Config,
    pub rng: ChaCha8Rng,
    pub now: u64,
    pub nodes: Vec<SimNode>,
    net: Network,
    queue: EventQueue,
    /// Which node the coordinator made primary last (the others are replicas or stale).
    pub primary: NodeId,
    pub checker: Checker,
    pub stats: Stats,
    pub trace: Vec<String>,
    pub verbose: bool,
    volume: VolumeId,
    /// Connection ids as the replicas see them.
    conn_ids: HashMap<ConnKey, u64>,
    conn_keys: HashMap<u64, ConnKey>,
    next_conn: u64,
    /// The highest epoch the coordinator ever handed out: epochs come only from it, so two
    /// primaries never claim the same one even when some node is unreachable.
    max_epoch: Epoch,
    /// Flush ids are unique across primaries and lives.
    next_barrier: u64,
    /// How each flush ended (absent: still pending, or dropped with its primary).
    pub outcomes: HashMap<u64, FlushOutcome>,
    /// The etcd-led mode's state, if on.
    control: Option<control::ControlPlane>,
}

fn id(n: u8) -> VolumeId {
    VolumeId([n; 16])
}

impl Cluster {
    pub fn new(cfg: Config) -> Cluster {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let volume = id(0xee);
        let nodes = (0..cfg.nodes)
            .map(|i| SimNode {
                name: format!("n{i}"),
                store: SimStore::new(volume, id(i as u8 + 1)),
                role: None,
                alive: true,
                life: 0,
                full: false,
            })
            .collect();
        let mut c = Cluster {
            checker: Checker::new(cfg.mode),
            cfg,
            rng,
            now: 0,
            nodes,
            net: Network::default(),
            queue: EventQueue::default(),
            primary: 0,
            stats: Stats::default(),
            trace: Vec::new(),
            verbose: false,
            volume,
            conn_ids: HashMap::new(),
            conn_keys: HashMap::new(),
            next_conn: 1,
            max_epoch: Epoch(0),
            next_barrier: 1,
            outcomes: HashMap::new(),
            control: None,
        };
        if c.cfg.control.is_some() {
            c.start_controlled();
            return c;
        }
        for i in 1..c.nodes.len() {
            c.start_replica(i);
        }
        c.start_primary(0, Epoch(1));
        c.schedule(1, Ev::Tick);
        c
    }

    pub fn log(&mut self, line: String) {
        if self.verbose {
            eprintln!("[{:>6}] {line}", self.now);
        }
        self.trace.push(format!("[{:>6}] {line}", self.now));
        if self.trace.len() > 4000 {
            self.trace.drain(..1000);
        }
    }

    fn fail_on(&mut self, v: Option<Violation>) {
        if let Some(v) = v {
            self.log(format!("VIOLATION: {v}"));
            self.checker.violations.push(v);
        }
    }

    fn delay(&mut self) -> u64 {
        1 + self.rng.random_range(0..self.cfg.faults.max_delay.max(1))
    }

    /// How long a store takes to answer an fsync or a cut (milliseconds).
    fn disk_delay(&mut self) -> u64 {
        1 + self.rng.random_range(0..3u64)
    }

    /// A random pause between client steps (milliseconds).
    pub fn rng_step(&mut self) -> u64 {
        self.rng.random_range(0..4)
    }

    fn replica_names(&self, except: NodeId) -> Vec<(ReplicaId, NodeId)> {
        (0..self.nodes.len())
            .filter(|&i| i != except)
            .map(|i| (ReplicaId(self.nodes[i].name.clone()), i))
            .collect()
    }

    // ---- roles ---------------------------------------------------------------------

    fn start_replica(&mut self, n: NodeId) {
        let node = &mut self.nodes[n];
        node.alive = true;
        node.life += 1;
        let s = &node.store;
        let state = ReplicaState {
            volume_id: s.volume_id,
            volume_size: self.cfg.blocks * BLOCK,
            store_id: s.store_id,
            blank: s.blank,
            epoch: s.epoch,
            epoch_owner: s.epoch_owner,
            head: s.head(),
            head_epoch: s.head_epoch(),
            durable: s.durable,
            committed: s.committed,
            was_primary: s.role == StoreRole::Primary && s.epoch > Epoch(0),
            rebuilding: s.rebuilding,
            cursor: s.cursor.clone().filter(|_| s.rebuilding),
        };
        node.role = Some(Role::Replica(Box::new(ReplicaCore::new(state))));
        node.store.keep_wal_after_committed();
        let name = self.nodes[n].name.clone();
        self.log(format!("{name} starts as a replica"));
    }

    fn start_primary(&mut self, n: NodeId, epoch: Epoch) {
        // Under etcd, the epoch is the one the campaign took, exactly.
        let epoch = if self.control.is_some() {
            epoch
        } else {
            epoch.max(self.max_epoch.next())
        };
        self.max_epoch = self.max_epoch.max(epoch);
        let peers = self.replica_names(n);
        let node = &mut self.nodes[n];
        node.alive = true;
        node.life += 1;
        // `serve` opens the store, which fsyncs what it replayed before calling it durable.
        node.store.sync();
        // The epoch is persisted before anything is served at it.
        node.store.epoch = epoch;
        node.store.epoch_owner = node.store.store_id;
        node.store.role = StoreRole::Primary;
        if self.cfg.mode == CommitMode::SyncQuorum {
            // As `serve` does (Store::append_epoch_start): a durable entry of the new epoch
            // before anything is served.
            let e = Entry {
                lsn: node.store.head().next(),
                epoch,
                block: EPOCH_START,
                value: 0,
            };
            node.store.append(e);
            node.store.sync();
            self.checker.wrote(e);
        }
        let cfg = self.primary_config(n, epoch, &peers);
        let s = &self.nodes[n].store;
        let core = PrimaryCore::new(
            cfg,
            s.head(),
            s.history.clone(),
            s.committed,
            s.retained_from,
            self.now,
        );
        let node = &mut self.nodes[n];
        node.store.pin = core.pin();
        node.role = Some(Role::Primary(Box::new(PrimaryNode {
            core,
            peers,
            barriers: HashMap::new(),
            last_committed: Lsn::ZERO,
        })));
        self.primary = n;
        let name = self.nodes[n].name.clone();
        let (head, committed) = (self.nodes[n].store.head(), self.nodes[n].store.committed);
        self.log(format!(
            "{name} serves as primary at epoch {epoch} (head {head}, committed {committed})"
        ));
    }

    /// The primary core's configuration: short timeouts, so faults play out in few steps.
    fn primary_config(
        &self,
        n: NodeId,
        epoch: Epoch,
        peers: &[(ReplicaId, NodeId)],
    ) -> PrimaryConfig {
        let mut cfg = PrimaryConfig::new(
            self.volume,
            self.cfg.blocks * BLOCK,
            self.nodes[n].store.store_id,
            epoch,
            self.cfg.mode,
            peers.iter().map(|(r, _)| r.clone()).collect(),
        );
        cfg.barrier_timeout = 400;
        cfg.handshake_timeout = 300;
        cfg.reconnect_min = 20;
        cfg.reconnect_max = 200;
        cfg.retention_bytes = self.cfg.retention_entries * BLOCK;
        cfg.retention_time = 5_000;
        cfg.catch_up_batch_bytes = 16 * BLOCK;
        cfg.progress_interval = 30;
        if let Some(control) = self.cfg.control.as_ref().filter(|c| c.failsafe) {
            cfg.confirm_interval = (control.timing.renew / 5).max(1);
        }
        cfg
    }

    // ---- the client ----------------------------------------------------------------

    /// One client step: a write, or (sometimes) a flush, to the current primary.
    pub fn client_step(&mut self, flush_prob: f64) {
        let p = self.primary;
        if !self.nodes[p].alive {
            return;
        }
        if self.rng.random_bool(flush_prob) {
            self.flush();
        } else {
            let block = self.rng.random_range(0..self.cfg.blocks);
            self.write(block);
        }
    }

    pub fn write(&mut self, block: u64) -> bool {
        self.write_on(self.primary, block).is_some()
    }

    /// A client write to node `n`, if it serves as a primary (a zombie too): its LSN and the
    /// value written.
    pub fn write_on(&mut self, n: NodeId, block: u64) -> Option<(Lsn, u64)> {
        if !self.may_acknowledge(n) {
            return None;
        }
        let node = &mut self.nodes[n];
        let epoch = match node.primary() {
            Some(pn) if node.alive && pn.core.fenced().is_none() => pn.core.epoch(),
            _ => return None,
        };
        let e = Entry {
            lsn: node.store.head().next(),
            epoch,
            block,
            value: self.checker.new_value(),
        };
        node.store.append(e);
        self.checker.wrote(e);
        self.stats.writes += 1;
        self.step(
            n,
            primary::Event::Appended {
                records: vec![e.record()],
            },
        );
        self.write_acknowledged(n, block, e.value);
        Some((e.lsn, e.value))
    }

    pub fn flush(&mut self) {
        self.flush_on(self.primary);
    }

    /// A client FLUSH on node `n`, if it serves as a primary: the flush id (see `outcomes`).
    pub fn flush_on(&mut self, n: NodeId) -> Option<u64> {
        let now = self.now;
        let id = self.next_barrier;
        let node = &mut self.nodes[n];
        let target = node.store.head();
        let alive = node.alive;
        let pn = node.primary_mut()?;
        if !alive {
            return None;
        }
        self.next_barrier += 1;
        pn.barriers.insert(id, target);
        self.step(n, primary::Event::Barrier { id, target, now });
        self.disk_job(n, Job::LocalSync { lsn: target });
        Some(id)
    }

    // ---- reporting -------------------------------------------------------------------

    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let role = match &n.role {
                Some(Role::Primary(pn)) => {
                    let peers: Vec<String> = pn
                        .core
                        .peers()
                        .iter()
                        .map(|p| format!("{}={}@{}", p.id, p.state.name(), p.durable))
                        .collect();
                    format!(
                        "primary e{} committed {} fenced {:?} [{}]",
                        pn.core.epoch(),
                        pn.core.committed(),
                        pn.core.fenced(),
                        peers.join(" ")
                    )
                }
                Some(Role::Replica(_)) => "replica".into(),
                None => "down".into(),
            };
            out.push_str(&format!(
                "\n  {i} {} alive={} epoch {} head {} durable {} image {} rebuilding {} {role}",
                n.name,
                n.alive,
                n.store.epoch,
                n.store.head(),
                n.store.durable,
                n.store.image_lsn,
                n.store.rebuilding
            ));
        }
        out
    }
}
