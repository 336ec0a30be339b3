//! A simulated cluster: nodes running the real primary and replica cores over the simulated
//! network and stores, a client, a coordinator that injects faults and fails over, and the
//! checker (see `check`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use blockrep_replication::core::primary::{self, PrimaryConfig, PrimaryCore};
use blockrep_replication::core::replica::{self, ConnId, ReplicaCore, ReplicaState};
use blockrep_replication::core::{promotion, CommitMode, ReplicaId, SessionId};
use blockrep_replication::wire::{Body, Frame};
use blockrep_storage::{epoch_at, Epoch, Lsn, VolumeId};
use bytes::Bytes;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::check::{Checker, Violation};
use crate::net::{ConnKey, Network, NodeId};
use crate::store::{Entry, SimStore, StoreRole, BLOCK, EPOCH_START};

#[path = "script.rs"]
mod script;

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
    pub catch_ups: u64,
    /// Replica logs cut back to the primary's instead of being rebuilt.
    pub truncations: u64,
    pub rebuilds: u64,
    pub checks: u64,
}

struct PrimaryNode {
    core: PrimaryCore,
    peers: Vec<(ReplicaId, NodeId)>,
    /// Barrier id -> target.
    barriers: HashMap<u64, Lsn>,
    last_committed: Lsn,
}

enum Role {
    Primary(Box<PrimaryNode>),
    Replica(Box<ReplicaCore>),
}

pub struct Node {
    pub name: String,
    pub store: SimStore,
    role: Option<Role>,
    pub alive: bool,
    /// Bumped by every (re)start, so events of an earlier life are recognised and dropped.
    pub life: u64,
}

#[derive(Debug)]
enum Ev {
    /// A frame on a connection, to the replica (`to_replica`) or back to the primary.
    Deliver {
        conn: ConnKey,
        to_replica: bool,
        frame: Frame,
    },
    ConnectDone {
        conn: ConnKey,
        ok: bool,
    },
    /// One side learns the connection is gone.
    Closed {
        conn: ConnKey,
        tell_replica: bool,
    },
    /// A side closes after its queued frames went out: the connection ends for both.
    CloseNow {
        conn: ConnKey,
        tell_replica: bool,
    },
    LocalSync {
        node: NodeId,
        life: u64,
        lsn: Lsn,
    },
    ReplicaSync {
        node: NodeId,
        life: u64,
        conn: u64,
        lsn: Lsn,
    },
    /// A replica store's cut of its log (answer to `Truncate`).
    Truncate {
        node: NodeId,
        life: u64,
        conn: u64,
        keep: Lsn,
    },
    RebuildFinish {
        node: NodeId,
        life: u64,
        conn: u64,
    },
    WalRead {
        node: NodeId,
        life: u64,
        replica: ReplicaId,
        session: SessionId,
        from: Lsn,
    },
    RebuildBase {
        node: NodeId,
        life: u64,
        replica: ReplicaId,
        session: SessionId,
    },
    BaseStream {
        node: NodeId,
        life: u64,
        replica: ReplicaId,
        session: SessionId,
    },
    Tick,
}

impl Ev {
    /// Data before timers within one millisecond.
    fn class(&self) -> u8 {
        u8::from(matches!(self, Ev::Tick))
    }
}

pub struct Cluster {
    pub cfg: Config,
    pub rng: ChaCha8Rng,
    pub now: u64,
    pub nodes: Vec<Node>,
    net: Network,
    queue: BinaryHeap<Reverse<(u64, u8, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
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
    lives: HashMap<NodeId, u64>,
    /// The highest epoch the coordinator ever handed out: epochs come only from it, so two
    /// primaries never claim the same one even when some node is unreachable.
    max_epoch: Epoch,
    /// Flush ids are unique across primaries and lives.
    next_barrier: u64,
    /// How each flush ended (absent: still pending, or dropped with its primary).
    pub outcomes: HashMap<u64, FlushOutcome>,
}

/// How a FLUSH ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushOutcome {
    Acked,
    Failed(String),
}

fn id(n: u8) -> VolumeId {
    VolumeId([n; 16])
}

impl Cluster {
    pub fn new(cfg: Config) -> Cluster {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let volume = id(0xee);
        let nodes = (0..cfg.nodes)
            .map(|i| Node {
                name: format!("n{i}"),
                store: SimStore::new(volume, id(i as u8 + 1)),
                role: None,
                alive: true,
                life: 0,
            })
            .collect();
        let mut c = Cluster {
            checker: Checker::new(cfg.mode),
            cfg,
            rng,
            now: 0,
            nodes,
            net: Network::default(),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            primary: 0,
            stats: Stats::default(),
            trace: Vec::new(),
            verbose: false,
            volume,
            conn_ids: HashMap::new(),
            conn_keys: HashMap::new(),
            next_conn: 1,
            lives: HashMap::new(),
            max_epoch: Epoch(0),
            next_barrier: 1,
            outcomes: HashMap::new(),
        };
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

    fn schedule(&mut self, delay: u64, ev: Ev) {
        let at = self.now + delay;
        self.seq += 1;
        self.queue.push(Reverse((at, ev.class(), self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn delay(&mut self) -> u64 {
        1 + self.rng.random_range(0..self.cfg.faults.max_delay.max(1))
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
        };
        node.role = Some(Role::Replica(Box::new(ReplicaCore::new(state))));
        self.lives.insert(n, self.nodes[n].life);
        let name = self.nodes[n].name.clone();
        self.log(format!("{name} starts as a replica"));
    }

    fn start_primary(&mut self, n: NodeId, epoch: Epoch) {
        let epoch = epoch.max(self.max_epoch.next());
        self.max_epoch = epoch;
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
        let mut cfg = PrimaryConfig::new(
            self.volume,
            self.cfg.blocks * BLOCK,
            node.store.store_id,
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
        let core = PrimaryCore::new(
            cfg,
            node.store.head(),
            node.store.history.clone(),
            node.store.committed,
            node.store.retained_from,
            self.now,
        );
        node.store.pin = core.pin();
        node.role = Some(Role::Primary(Box::new(PrimaryNode {
            core,
            peers,
            barriers: HashMap::new(),
            last_committed: Lsn::ZERO,
        })));
        self.lives.insert(n, self.nodes[n].life);
        self.primary = n;
        let name = self.nodes[n].name.clone();
        let (head, committed) = (self.nodes[n].store.head(), self.nodes[n].store.committed);
        self.log(format!(
            "{name} serves as primary at epoch {epoch} (head {head}, committed {committed})"
        ));
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
        let node = &mut self.nodes[n];
        let Some(Role::Primary(pn)) = &mut node.role else {
            return None;
        };
        if !node.alive || pn.core.fenced().is_some() {
            return None;
        }
        let lsn = node.store.head().next();
        let e = Entry {
            lsn,
            epoch: pn.core.epoch(),
            block,
            value: self.checker.new_value(),
        };
        node.store.append(e);
        self.checker.wrote(e);
        self.stats.writes += 1;
        let actions = pn.core.step(primary::Event::Appended {
            records: vec![e.record()],
        });
        self.primary_actions(n, actions);
        Some((lsn, e.value))
    }

    pub fn flush(&mut self) {
        self.flush_on(self.primary);
    }

    /// A client FLUSH on node `n`, if it serves as a primary: the flush id (see `outcomes`).
    pub fn flush_on(&mut self, n: NodeId) -> Option<u64> {
        let now = self.now;
        let id = self.next_barrier;
        let node = &mut self.nodes[n];
        let Some(Role::Primary(pn)) = &mut node.role else {
            return None;
        };
        if !node.alive {
            return None;
        }
        self.next_barrier += 1;
        let target = node.store.head();
        pn.barriers.insert(id, target);
        let life = node.life;
        let actions = pn.core.step(primary::Event::Barrier { id, target, now });
        self.primary_actions(n, actions);
        let d = 1 + self.rng.random_range(0..3u64);
        self.schedule(
            d,
            Ev::LocalSync {
                node: n,
                life,
                lsn: target,
            },
        );
        Some(id)
    }

    // ---- faults and the coordinator ------------------------------------------------

    pub fn random_faults(&mut self) {
        let f = self.cfg.faults.clone();
        if self.rng.random_bool(f.reset) {
            let conns = self.net.of_node(self.rng.random_range(0..self.nodes.len()));
            if let Some(&k) = conns.first() {
                self.stats.resets += 1;
                self.log(format!("fault: reset connection {k:?}"));
                self.reset(k);
            }
        }
        if self.rng.random_bool(f.partition) {
            let a = self.rng.random_range(0..self.nodes.len());
            let b = self.rng.random_range(0..self.nodes.len());
            if a != b {
                self.stats.partitions += 1;
                self.log(format!("fault: partition {a} | {b}"));
                self.net.partition(a, b);
                for k in self.net.of_node(a) {
                    if k.primary == b || k.replica == b {
                        self.reset(k);
                    }
                }
            }
        }
        if self.rng.random_bool(f.heal) {
            self.net.heal();
        }
        if self.rng.random_bool(f.crash) {
            let n = self.rng.random_range(0..self.nodes.len());
            if self.nodes[n].alive {
                self.crash(n);
            }
        }
        if self.rng.random_bool(f.restart) {
            let dead: Vec<NodeId> = (0..self.nodes.len())
                .filter(|&i| !self.nodes[i].alive)
                .collect();
            if !dead.is_empty() {
                let n = dead[self.rng.random_range(0..dead.len())];
                self.restart(n);
            }
        }
        if self.rng.random_bool(f.failover) {
            self.failover();
        }
    }

    fn reset(&mut self, k: ConnKey) {
        if self.net.close(&k) {
            let d = self.delay();
            self.schedule(
                d,
                Ev::Closed {
                    conn: k,
                    tell_replica: true,
                },
            );
            let d = self.delay();
            self.schedule(
                d,
                Ev::Closed {
                    conn: k,
                    tell_replica: false,
                },
            );
        }
    }

    pub fn crash(&mut self, n: NodeId) {
        let unsynced = self.nodes[n].store.head().0 - self.nodes[n].store.durable.0;
        let keep = if unsynced == 0 {
            0
        } else {
            self.rng.random_range(0..=unsynced)
        };
        self.crash_keeping(n, keep);
    }

    /// Power loss on `n`: of its unsynced entries, the first `keep` survive.
    pub fn crash_keeping(&mut self, n: NodeId, keep: u64) {
        self.stats.crashes += 1;
        let unsynced = self.nodes[n].store.head().0 - self.nodes[n].store.durable.0;
        let keep = keep.min(unsynced);
        let node = &mut self.nodes[n];
        node.alive = false;
        node.role = None;
        node.store.crash(keep);
        let name = node.name.clone();
        let head = node.store.head();
        self.log(format!(
            "fault: {name} crashes (keeps {keep} of {unsynced} unsynced; head {head})"
        ));
        for k in self.net.of_node(n) {
            self.reset(k);
        }
    }

    /// A crashed node comes back: the last primary as primary again at a new epoch (as a
    /// restarted `serve` does), anything else as a replica (an old primary rejoins).
    pub fn restart(&mut self, n: NodeId) {
        if self.nodes[n].alive {
            return;
        }
        if n == self.primary {
            let epoch = self.nodes[n].store.epoch.next();
            self.start_primary(n, epoch);
        } else {
            self.start_replica(n);
        }
        let v = self.checker.after_restart(self.primary, &self.nodes);
        self.fail_on(v);
    }

    /// Manual failover: the current primary is taken down (killed, or left running as a
    /// zombie behind a partition), and the best replica is promoted if the rule allows it.
    pub fn failover(&mut self) {
        let old = self.primary;
        if self.rng.random_bool(0.5) {
            if self.nodes[old].alive {
                self.crash(old);
            }
        } else {
            // A zombie: still running and accepting writes, cut off from everyone.
            for i in 0..self.nodes.len() {
                if i != old {
                    self.net.partition(old, i);
                }
            }
            for k in self.net.of_node(old) {
                self.reset(k);
            }
            self.log(format!(
                "fault: {} is cut off (zombie)",
                self.nodes[old].name
            ));
        }
        if self.elect(old).is_some() {
            self.stats.failovers += 1;
        } else {
            self.log("failover: no eligible candidate".into());
        }
    }

    /// The coordinator tries the live nodes other than `old`, most complete log first (by
    /// head epoch, then head; ties to the lowest name), and promotes the first the rule
    /// accepts.
    pub fn elect(&mut self, old: NodeId) -> Option<NodeId> {
        let mut candidates: Vec<NodeId> = (0..self.nodes.len())
            .filter(|&i| i != old && self.nodes[i].alive)
            .collect();
        candidates.sort_by_key(|&i| {
            Reverse((
                self.nodes[i].store.head_epoch(),
                self.nodes[i].store.head(),
                Reverse(i),
            ))
        });
        candidates.into_iter().find(|&c| self.promote(c))
    }

    /// `blockrep serve` on a replica's store: probe the reachable members, apply the rule.
    pub fn promote(&mut self, c: NodeId) -> bool {
        let me = self.facts(c);
        let name = self.nodes[c].name.clone();
        // First a look that disturbs nobody, as `serve` does.
        let members: Vec<promotion::Facts> =
            self.members(c).into_iter().map(|i| self.facts(i)).collect();
        if let Err(why) = promotion::check(&me, &members, self.nodes.len() - 1, self.cfg.mode) {
            self.stats.refused_promotions += 1;
            self.log(format!("promotion of {name} refused: {why}"));
            return false;
        }
        // Then fence the members at the new epoch and decide on what they hold after it.
        let epoch = promotion::next_epoch(&me, &members).max(self.max_epoch.next());
        let owner = self.nodes[c].store.store_id;
        let mut fenced = Vec::new();
        for i in self.members(c) {
            if let Some(f) = self.fence(i, epoch, owner) {
                fenced.push(f);
            }
        }
        if let Err(why) = promotion::check(&me, &fenced, self.nodes.len() - 1, self.cfg.mode) {
            self.stats.refused_promotions += 1;
            self.log(format!("promotion of {name} refused after fencing: {why}"));
            self.max_epoch = self.max_epoch.max(epoch);
            return false;
        }
        let v = self.checker.promoted(c, &self.nodes);
        self.fail_on(v);
        for k in self.net.of_node(c) {
            self.reset(k);
        }
        self.nodes[c].role = None;
        self.start_primary(c, epoch);
        true
    }

    fn facts(&self, i: NodeId) -> promotion::Facts {
        let s = &self.nodes[i].store;
        promotion::Facts {
            name: self.nodes[i].name.clone(),
            head: s.head(),
            head_epoch: s.head_epoch(),
            committed: s.committed,
            epoch: s.epoch,
            needs_rebuild: s.rebuilding,
        }
    }

    /// The nodes a promotion of `c` can probe: replicas it can reach (a primary, live or
    /// zombie, does not answer probes).
    fn members(&self, c: NodeId) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&i| {
                i != c
                    && self.nodes[i].alive
                    && self.net.connected(c, i)
                    && matches!(self.nodes[i].role, Some(Role::Replica(_)))
            })
            .collect()
    }

    /// Delivers a fencing probe to replica `i` through its core; its answer, if it accepted.
    fn fence(&mut self, i: NodeId, epoch: Epoch, owner: VolumeId) -> Option<promotion::Facts> {
        let conn = ConnId(u64::MAX - i as u64);
        let Some(Role::Replica(core)) = &mut self.nodes[i].role else {
            return None;
        };
        let actions = core.step(replica::Event::Received {
            conn,
            frame: Frame {
                epoch,
                body: Body::Probe { fence: Some(owner) },
            },
        });
        let mut reply = None;
        let mut rest = Vec::new();
        for a in actions {
            match a {
                replica::Action::Send { conn: to, frame } if to == conn => {
                    if let Body::ProbeReply {
                        head,
                        head_epoch,
                        committed,
                        needs_rebuild,
                        ..
                    } = frame.body
                    {
                        reply = Some(promotion::Facts {
                            name: self.nodes[i].name.clone(),
                            head,
                            head_epoch,
                            committed,
                            epoch: frame.epoch,
                            needs_rebuild,
                        });
                    }
                }
                replica::Action::Close { conn: to, .. } if to == conn => {}
                other => rest.push(other),
            }
        }
        self.replica_actions(i, rest);
        if reply.is_some() {
            self.log(format!("{} fenced at epoch {epoch}", self.nodes[i].name));
        }
        reply
    }

    fn fail_on(&mut self, v: Option<Violation>) {
        if let Some(v) = v {
            self.log(format!("VIOLATION: {v}"));
            self.checker.violations.push(v);
        }
    }

    // ---- the event loop --------------------------------------------------------------

    /// Runs everything due by `until`.
    pub fn run_until(&mut self, until: u64) {
        while let Some(Reverse((at, _, seq))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            if let Some(ev) = self.events.remove(&seq) {
                self.handle(ev);
            }
            if !self.checker.violations.is_empty() {
                return;
            }
        }
        self.now = until;
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick => {
                self.tick();
                self.schedule(10, Ev::Tick);
            }
            Ev::Deliver {
                conn,
                to_replica,
                frame,
            } => {
                if !self.net.is_open(&conn) {
                    return;
                }
                if to_replica {
                    let n = conn.replica;
                    if !self.nodes[n].alive {
                        return;
                    }
                    let cid = self.conn_ids[&conn];
                    let actions = match &mut self.nodes[n].role {
                        Some(Role::Replica(core)) => core.step(replica::Event::Received {
                            conn: ConnId(cid),
                            frame,
                        }),
                        _ => return,
                    };
                    self.replica_actions(n, actions);
                } else {
                    let p = conn.primary;
                    if !self.alive_life(p, conn_life(&conn)) {
                        return;
                    }
                    let replica = ReplicaId(self.nodes[conn.replica].name.clone());
                    let now = self.now;
                    let actions = match &mut self.nodes[p].role {
                        Some(Role::Primary(pn)) => pn.core.step(primary::Event::Received {
                            replica,
                            session: SessionId(conn_session(&conn)),
                            frame,
                            now,
                        }),
                        _ => return,
                    };
                    self.primary_actions(p, actions);
                }
            }
            Ev::CloseNow { conn, tell_replica } => {
                if self.net.close(&conn) {
                    self.handle(Ev::Closed { conn, tell_replica });
                }
            }
            Ev::ConnectDone { conn, ok } => {
                let p = conn.primary;
                if !self.alive_life(p, conn_life(&conn)) {
                    return;
                }
                let replica = ReplicaId(self.nodes[conn.replica].name.clone());
                let session = SessionId(conn_session(&conn));
                let now = self.now;
                let ev = if ok {
                    self.net.open(conn, now);
                    primary::Event::Connected {
                        replica,
                        session,
                        now,
                    }
                } else {
                    primary::Event::Disconnected {
                        replica,
                        session,
                        now,
                        reason: "connection refused".into(),
                    }
                };
                let actions = match &mut self.nodes[p].role {
                    Some(Role::Primary(pn)) => pn.core.step(ev),
                    _ => return,
                };
                self.primary_actions(p, actions);
            }
            Ev::Closed { conn, tell_replica } => {
                if tell_replica {
                    let n = conn.replica;
                    let Some(&cid) = self.conn_ids.get(&conn) else {
                        return;
                    };
                    if !self.nodes[n].alive {
                        return;
                    }
                    let actions = match &mut self.nodes[n].role {
                        Some(Role::Replica(core)) => {
                            core.step(replica::Event::Closed { conn: ConnId(cid) })
                        }
                        _ => return,
                    };
                    self.replica_actions(n, actions);
                } else {
                    let p = conn.primary;
                    if !self.alive_life(p, conn_life(&conn)) {
                        return;
                    }
                    let replica = ReplicaId(self.nodes[conn.replica].name.clone());
                    let now = self.now;
                    let actions = match &mut self.nodes[p].role {
                        Some(Role::Primary(pn)) => pn.core.step(primary::Event::Disconnected {
                            replica,
                            session: SessionId(conn_session(&conn)),
                            now,
                            reason: "connection lost".into(),
                        }),
                        _ => return,
                    };
                    self.primary_actions(p, actions);
                }
            }
            Ev::LocalSync { node, life, lsn } => {
                if !self.alive_life(node, life) {
                    return;
                }
                let durable = {
                    let s = &mut self.nodes[node].store;
                    s.durable = s.durable.max(lsn.min(s.head()));
                    s.durable
                };
                let actions = match &mut self.nodes[node].role {
                    Some(Role::Primary(pn)) => {
                        pn.core.step(primary::Event::LocalDurable { lsn: durable })
                    }
                    _ => return,
                };
                self.primary_actions(node, actions);
            }
            Ev::ReplicaSync {
                node,
                life,
                conn,
                lsn,
            } => {
                if !self.alive_life(node, life) {
                    return;
                }
                let durable = {
                    let s = &mut self.nodes[node].store;
                    let _ = lsn;
                    s.sync()
                };
                let actions = match &mut self.nodes[node].role {
                    Some(Role::Replica(core)) => core.step(replica::Event::Synced {
                        conn: ConnId(conn),
                        durable,
                    }),
                    _ => return,
                };
                self.replica_actions(node, actions);
            }
            Ev::Truncate {
                node,
                life,
                conn,
                keep,
            } => {
                if !self.alive_life(node, life) {
                    return;
                }
                let s = &mut self.nodes[node].store;
                let refusal = s.truncate_after(keep).err();
                let (head, head_epoch) = (s.head(), s.head_epoch());
                if refusal.is_none() {
                    self.stats.truncations += 1;
                }
                let actions = match &mut self.nodes[node].role {
                    Some(Role::Replica(core)) => core.step(replica::Event::Truncated {
                        conn: ConnId(conn),
                        head,
                        head_epoch,
                        refusal,
                    }),
                    _ => return,
                };
                self.replica_actions(node, actions);
            }
            Ev::RebuildFinish { node, life, conn } => {
                if !self.alive_life(node, life) {
                    return;
                }
                self.nodes[node].store.finish_rebuild();
                let durable = self.nodes[node].store.durable;
                let actions = match &mut self.nodes[node].role {
                    Some(Role::Replica(core)) => core.step(replica::Event::RebuildFinished {
                        conn: ConnId(conn),
                        durable,
                    }),
                    _ => return,
                };
                self.replica_actions(node, actions);
            }
            Ev::WalRead {
                node,
                life,
                replica,
                session,
                from,
            } => {
                if !self.alive_life(node, life) {
                    return;
                }
                let now = self.now;
                let ev = match self.nodes[node].store.read_wal(from, 16) {
                    Some(records) => primary::Event::WalRead {
                        replica,
                        session,
                        from,
                        records,
                        now,
                    },
                    None => primary::Event::WalGone {
                        replica,
                        session,
                        from,
                        now,
                    },
                };
                let actions = match &mut self.nodes[node].role {
                    Some(Role::Primary(pn)) => pn.core.step(ev),
                    _ => return,
                };
                self.primary_actions(node, actions);
            }
            Ev::RebuildBase {
                node,
                life,
                replica,
                session,
            } => {
                if !self.alive_life(node, life) {
                    return;
                }
                let s = &mut self.nodes[node].store;
                let base = s.image_lsn;
                s.pin = Some(s.pin.map_or(base.next(), |p| p.min(base.next())));
                let history: Vec<(Epoch, Lsn)> = s
                    .history
                    .iter()
                    .copied()
                    .filter(|(_, l)| *l <= base)
                    .collect();
                let actions = match &mut self.nodes[node].role {
                    Some(Role::Primary(pn)) => pn.core.step(primary::Event::RebuildBase {
                        replica,
                        session,
                        base,
                        history,
                    }),
                    _ => return,
                };
                self.primary_actions(node, actions);
            }
            Ev::BaseStream {
                node,
                life,
                replica,
                session,
            } => {
                if !self.alive_life(node, life) {
                    return;
                }
                self.stream_base(node, replica, session);
            }
        }
    }

    fn alive_life(&self, n: NodeId, life: u64) -> bool {
        self.nodes[n].alive && self.nodes[n].life == life
    }

    fn tick(&mut self) {
        let now = self.now;
        for n in 0..self.nodes.len() {
            if !self.nodes[n].alive {
                continue;
            }
            // Stores checkpoint now and then (which also makes their entries durable).
            if self.rng.random_bool(0.2) {
                // Replicated stores gate checkpoints (`Store::set_checkpoint_gate`) unless the
                // WAL fills up while they wait.
                let gate = match &self.nodes[n].role {
                    Some(Role::Primary(pn)) => pn.core.checkpoint_gate(),
                    Some(Role::Replica(_)) => Some(self.nodes[n].store.committed),
                    None => None,
                };
                let overrun = self.rng.random_bool(self.cfg.faults.gate_overrun);
                let s = &mut self.nodes[n].store;
                if !s.rebuilding {
                    s.sync();
                }
                let kept = s.retained_from;
                match gate {
                    Some(g) if !overrun => s.checkpoint_through(g),
                    _ => s.checkpoint(),
                }
                if let Some(v) = self.recycled_needed_wal(n, kept) {
                    self.fail_on(Some(v));
                }
            }
            let pinned = {
                let s = &self.nodes[n].store;
                s.pin.map_or(0, |p| s.head().0.saturating_sub(p.0) + 1) * BLOCK
            };
            let actions = match &mut self.nodes[n].role {
                Some(Role::Primary(pn)) => pn.core.step(primary::Event::Tick {
                    now,
                    pinned_bytes: pinned,
                }),
                _ => continue,
            };
            self.primary_actions(n, actions);
        }
    }

    /// Retention: the primary's WAL keeps every entry a recoverable replica lacks (one the
    /// primary has not released to a rebuild), judged from the replicas' last reported
    /// durable LSNs rather than from the pin the core asked for.
    fn recycled_needed_wal(&self, n: NodeId, kept: Lsn) -> Option<Violation> {
        let Some(Role::Primary(pn)) = &self.nodes[n].role else {
            return None;
        };
        let retained = self.nodes[n].store.retained_from;
        for peer in pn.core.peers() {
            let recoverable = peer.recoverable && peer.state != primary::PeerState::Rebuilding;
            // Entries recycled before this checkpoint were gone before the replica asked.
            let needs = peer.durable.next();
            if recoverable && needs >= kept && retained > needs {
                return Some(Violation::new(
                    "the WAL recycled entries a recoverable replica still needs",
                    format!(
                        "{} ({}, durable {}) needs {} on; {} keeps only {retained} on",
                        peer.id,
                        peer.state.name(),
                        peer.durable,
                        peer.durable.next(),
                        self.nodes[n].name
                    ),
                ));
            }
        }
        None
    }

    // ---- executing the cores' actions ------------------------------------------------

    fn conn_key(&mut self, p: NodeId, replica: &ReplicaId, session: SessionId) -> Option<ConnKey> {
        let pn = match &self.nodes[p].role {
            Some(Role::Primary(pn)) => pn,
            _ => return None,
        };
        let r = pn.peers.iter().find(|(id, _)| id == replica)?.1;
        Some(ConnKey {
            primary: p,
            replica: r,
            session: pack(self.nodes[p].life, session.0),
        })
    }

    fn primary_actions(&mut self, p: NodeId, actions: Vec<primary::Action>) {
        let life = self.nodes[p].life;
        for a in actions {
            match a {
                primary::Action::Connect { replica, session } => {
                    let Some(k) = self.conn_key(p, &replica, session) else {
                        continue;
                    };
                    let cid = self.next_conn;
                    self.next_conn += 1;
                    self.conn_ids.insert(k, cid);
                    self.conn_keys.insert(cid, k);
                    let r = k.replica;
                    let ok = self.nodes[r].alive
                        && self.net.connected(p, r)
                        && matches!(self.nodes[r].role, Some(Role::Replica(_)));
                    let d = self.delay();
                    self.schedule(d, Ev::ConnectDone { conn: k, ok });
                }
                primary::Action::Send {
                    replica,
                    session,
                    frame,
                } => {
                    let Some(k) = self.conn_key(p, &replica, session) else {
                        continue;
                    };
                    self.send(k, true, frame);
                }
                primary::Action::Close {
                    replica, session, ..
                } => {
                    let Some(k) = self.conn_key(p, &replica, session) else {
                        continue;
                    };
                    self.close_after_queued(k, true);
                }
                primary::Action::ReadWal {
                    replica,
                    session,
                    from,
                    ..
                } => {
                    let d = self.delay();
                    self.schedule(
                        d,
                        Ev::WalRead {
                            node: p,
                            life,
                            replica,
                            session,
                            from,
                        },
                    );
                }
                primary::Action::PinWal { from } => self.nodes[p].store.pin = from,
                primary::Action::BeginRebuild { replica, session } => {
                    self.stats.rebuilds += 1;
                    let d = self.delay();
                    self.schedule(
                        d,
                        Ev::RebuildBase {
                            node: p,
                            life,
                            replica,
                            session,
                        },
                    );
                }
                primary::Action::StreamBase {
                    replica, session, ..
                } => {
                    let d = self.delay();
                    self.schedule(
                        d,
                        Ev::BaseStream {
                            node: p,
                            life,
                            replica,
                            session,
                        },
                    );
                }
                primary::Action::BarrierDone { id } => {
                    let target = match &mut self.nodes[p].role {
                        Some(Role::Primary(pn)) => pn.barriers.remove(&id),
                        _ => None,
                    };
                    if let Some(target) = target {
                        self.outcomes.insert(id, FlushOutcome::Acked);
                        self.stats.flushes_ok += 1;
                        let v =
                            self.checker
                                .flush_acked(p, target, &self.nodes, self.replica_set(p));
                        self.log(format!(
                            "flush through {target} acknowledged by {}",
                            self.nodes[p].name
                        ));
                        self.fail_on(v);
                    }
                }
                primary::Action::BarrierFailed { id, reason } => {
                    if let Some(Role::Primary(pn)) = &mut self.nodes[p].role {
                        pn.barriers.remove(&id);
                    }
                    self.outcomes
                        .insert(id, FlushOutcome::Failed(reason.name().to_string()));
                    self.stats.flushes_failed += 1;
                    self.log(format!(
                        "flush failed on {}: {}",
                        self.nodes[p].name,
                        reason.name()
                    ));
                }
                primary::Action::Committed { lsn } => {
                    let node = &mut self.nodes[p];
                    node.store.committed = node.store.committed.max(lsn);
                    if let Some(Role::Primary(pn)) = &mut node.role {
                        if lsn < pn.last_committed {
                            let v = Violation::new(
                                "committed LSN went down",
                                format!("{} -> {lsn}", pn.last_committed),
                            );
                            self.checker.violations.push(v);
                        }
                        pn.last_committed = lsn;
                    }
                }
                primary::Action::Fenced { epoch, reason } => {
                    let name = self.nodes[p].name.clone();
                    self.log(format!("{name} fenced by epoch {epoch}: {reason}"));
                }
                primary::Action::StateChanged {
                    replica,
                    state,
                    why,
                } => {
                    if state == primary::PeerState::CatchingUp {
                        self.stats.catch_ups += 1;
                    }
                    let name = self.nodes[p].name.clone();
                    self.log(format!("{name}: {replica} -> {} ({why})", state.name()));
                }
            }
        }
    }

    /// The configured replicas of primary `p`, by node.
    fn replica_set(&self, p: NodeId) -> Vec<NodeId> {
        match &self.nodes[p].role {
            Some(Role::Primary(pn)) => pn.peers.iter().map(|(_, n)| *n).collect(),
            _ => Vec::new(),
        }
    }

    /// Like TCP's FIN: the other side sees the close after every frame already sent.
    fn close_after_queued(&mut self, k: ConnKey, tell_replica: bool) {
        let d = self.delay();
        let now = self.now;
        if let Some(at) = self.net.schedule(&k, now, d) {
            self.schedule(
                at - now + 1,
                Ev::CloseNow {
                    conn: k,
                    tell_replica,
                },
            );
        }
    }

    fn send(&mut self, k: ConnKey, to_replica: bool, frame: Frame) {
        let d = self.delay();
        let now = self.now;
        if let Some(at) = self.net.schedule(&k, now, d) {
            self.schedule(
                at - now,
                Ev::Deliver {
                    conn: k,
                    to_replica,
                    frame,
                },
            );
        }
    }

    fn stream_base(&mut self, p: NodeId, replica: ReplicaId, session: SessionId) {
        let Some(k) = self.conn_key(p, &replica, session) else {
            return;
        };
        let epoch = self.nodes[p].store.epoch;
        // The data file as it is now: it may be newer than the base; WAL wins makes that safe.
        let image = self.nodes[p].store.image.clone();
        let blocks = self.cfg.blocks;
        let mut b = 0;
        while b < blocks {
            let n = 16.min(blocks - b);
            let mut data = Vec::with_capacity(n as usize * 8);
            for i in b..b + n {
                data.extend_from_slice(&image.get(&i).copied().unwrap_or(0).to_le_bytes());
            }
            let frame = Frame {
                epoch,
                body: Body::BaseChunk {
                    offset: b * BLOCK,
                    length: n * BLOCK,
                    data: Some(Bytes::from(data)),
                },
            };
            self.send(k, true, frame);
            b += n;
        }
        let now = self.now;
        let actions = match &mut self.nodes[p].role {
            Some(Role::Primary(pn)) => pn.core.step(primary::Event::BaseSent { replica, session }),
            _ => return,
        };
        let _ = now;
        self.primary_actions(p, actions);
    }

    fn replica_actions(&mut self, n: NodeId, actions: Vec<replica::Action>) {
        let life = self.nodes[n].life;
        for a in actions {
            match a {
                replica::Action::Send { conn, frame } => {
                    let Some(&k) = self.conn_keys.get(&conn.0) else {
                        continue;
                    };
                    self.send(k, false, frame);
                }
                replica::Action::Close { conn, .. } => {
                    let Some(&k) = self.conn_keys.get(&conn.0) else {
                        continue;
                    };
                    self.close_after_queued(k, false);
                }
                replica::Action::AdoptVolume { volume_id } => {
                    self.nodes[n].store.volume_id = volume_id;
                }
                replica::Action::AdoptEpoch { epoch, owner } => {
                    let s = &mut self.nodes[n].store;
                    s.epoch = epoch;
                    s.epoch_owner = owner;
                    s.role = StoreRole::Replica;
                }
                replica::Action::Append { record } => {
                    let e = Entry::from_record(&record);
                    let s = &mut self.nodes[n].store;
                    if e.lsn != s.head().next() {
                        // Only a mutant accepting gaps gets here: the store would refuse it.
                        let v = Violation::new(
                            "a replica accepted an entry with an LSN gap",
                            format!(
                                "{} got {} after {}",
                                self.nodes[n].name,
                                e.lsn,
                                self.nodes[n].store.head()
                            ),
                        );
                        self.checker.violations.push(v);
                        return;
                    }
                    s.append(e);
                }
                replica::Action::Sync { conn, lsn } => {
                    let d = 1 + self.rng.random_range(0..3u64);
                    self.schedule(
                        d,
                        Ev::ReplicaSync {
                            node: n,
                            life,
                            conn: conn.0,
                            lsn,
                        },
                    );
                }
                replica::Action::SetCommitted { lsn } => {
                    let s = &mut self.nodes[n].store;
                    s.committed = s.committed.max(lsn);
                }
                replica::Action::BeginRebuild { base, history } => {
                    self.nodes[n].store.begin_rebuild(base, history);
                }
                replica::Action::ApplyBase { offset, data, .. } => {
                    let first = offset / BLOCK;
                    let values: Vec<(u64, u64)> = data
                        .map(|d| {
                            d.chunks(8)
                                .enumerate()
                                .map(|(i, c)| {
                                    let mut v = [0u8; 8];
                                    v[..c.len()].copy_from_slice(c);
                                    (first + i as u64, u64::from_le_bytes(v))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    self.nodes[n].store.apply_base(&values);
                }
                replica::Action::Truncate { conn, keep } => {
                    let d = 1 + self.rng.random_range(0..3u64);
                    self.schedule(
                        d,
                        Ev::Truncate {
                            node: n,
                            life,
                            conn: conn.0,
                            keep,
                        },
                    );
                }
                replica::Action::FinishRebuild { conn, .. } => {
                    let d = 1 + self.rng.random_range(0..3u64);
                    self.schedule(
                        d,
                        Ev::RebuildFinish {
                            node: n,
                            life,
                            conn: conn.0,
                        },
                    );
                }
            }
        }
    }

    // ---- liveness ----------------------------------------------------------------------

    /// Stops faults, heals the network, brings every node back, and runs until the cluster
    /// converges: every replica in sync and holding the primary's volume, after a flush.
    pub fn converge(&mut self, budget_ms: u64) -> Result<(), Violation> {
        self.net.heal();
        // A fenced or dead primary is replaced by the coordinator.
        let p = self.primary;
        let fenced =
            matches!(&self.nodes[p].role, Some(Role::Primary(pn)) if pn.core.fenced().is_some());
        if fenced || !self.nodes[p].alive {
            self.log("liveness: replacing the primary".into());
            let mut candidates: Vec<NodeId> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].alive && i != p)
                .collect();
            candidates.sort_by_key(|&i| {
                Reverse((
                    self.nodes[i].store.head_epoch(),
                    self.nodes[i].store.head(),
                    Reverse(i),
                ))
            });
            let mut promoted = false;
            for c in candidates {
                if self.promote(c) {
                    promoted = true;
                    break;
                }
            }
            if !promoted {
                // Nobody else can take over: the old primary comes back.
                if !self.nodes[p].alive {
                    self.restart(p);
                } else {
                    let epoch = self.nodes[p].store.epoch.next();
                    self.nodes[p].role = None;
                    self.start_primary(p, epoch);
                }
            }
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                self.restart(i);
            } else if i != self.primary && !matches!(self.nodes[i].role, Some(Role::Replica(_))) {
                // A stale primary (zombie) stops serving and rejoins as a replica.
                self.nodes[i].role = None;
                for k in self.net.of_node(i) {
                    self.reset(k);
                }
                self.start_replica(i);
            }
        }
        let deadline = self.now + budget_ms;
        while self.now < deadline {
            self.write_some();
            self.flush();
            let t = self.now + 50;
            self.run_until(t);
            if let Some(v) = self.checker.violations.first() {
                return Err(v.clone());
            }
            if self.converged() {
                return self.checker.final_state(self.primary, &self.nodes);
            }
        }
        Err(Violation::new(
            "no convergence after faults stopped",
            self.describe(),
        ))
    }

    /// A random pause between client steps (milliseconds).
    pub fn rng_step(&mut self) -> u64 {
        self.rng.random_range(0..4)
    }

    fn write_some(&mut self) {
        let b = self.rng.random_range(0..self.cfg.blocks);
        self.write(b);
    }

    fn converged(&self) -> bool {
        let p = self.primary;
        let Some(Role::Primary(pn)) = &self.nodes[p].role else {
            return false;
        };
        if pn.core.fenced().is_some() {
            return false;
        }
        let head = self.nodes[p].store.head();
        pn.core
            .peers()
            .iter()
            .all(|peer| peer.state == primary::PeerState::InSync && peer.durable == head)
            && pn.core.committed() == head
    }

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

/// A connection's session field packs the primary's life and the core's session number, so
/// a restarted primary's sessions never collide with its earlier life's.
fn pack(life: u64, session: u64) -> u64 {
    (life << 40) | session
}

fn conn_life(k: &ConnKey) -> u64 {
    k.session >> 40
}

fn conn_session(k: &ConnKey) -> u64 {
    k.session & ((1 << 40) - 1)
}

/// The final state of the volume according to a node's log lineage.
pub fn expected_state(
    entries: &BTreeMap<(Lsn, Epoch), Entry>,
    history: &[(Epoch, Lsn)],
    head: Lsn,
) -> BTreeMap<u64, u64> {
    let mut s = BTreeMap::new();
    for l in 1..=head.0 {
        let lsn = Lsn(l);
        let Some(e) = epoch_at(history, lsn) else {
            continue;
        };
        if let Some(entry) = entries.get(&(lsn, e)).filter(|e| e.writes()) {
            s.insert(entry.block, entry.value);
        }
    }
    s
}
