//! The event queue: what can happen at a simulated instant, and what each event does to the
//! node it reaches. An event for an earlier life of a node, or for a core the node no longer
//! runs, is dropped.

use std::cmp::Reverse;

use blockrep_replication::core::primary;
use blockrep_replication::core::replica::{self, ConnId};
use blockrep_replication::core::{ReplicaId, SessionId};
use blockrep_replication::wire::Frame;
use blockrep_storage::{Epoch, Lsn};
use rand::RngExt;

use super::execution::{conn_life, conn_session};
use super::Cluster;
use crate::check::Violation;
use crate::net::{ConnKey, NodeId};
use crate::node::Role;
use crate::store::BLOCK;

#[derive(Debug)]
pub(super) enum Ev {
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

    /// The node and life a store or core result belongs to (None for network and timer
    /// events, which are checked against the connection instead).
    fn owner(&self) -> Option<(NodeId, u64)> {
        match *self {
            Ev::LocalSync { node, life, .. }
            | Ev::ReplicaSync { node, life, .. }
            | Ev::Truncate { node, life, .. }
            | Ev::RebuildFinish { node, life, .. }
            | Ev::WalRead { node, life, .. }
            | Ev::RebuildBase { node, life, .. }
            | Ev::BaseStream { node, life, .. } => Some((node, life)),
            Ev::Deliver { .. }
            | Ev::ConnectDone { .. }
            | Ev::Closed { .. }
            | Ev::CloseNow { .. }
            | Ev::Tick => None,
        }
    }
}

impl Cluster {
    pub(super) fn schedule(&mut self, delay: u64, ev: Ev) {
        let at = self.now + delay;
        self.seq += 1;
        self.queue.push(Reverse((at, ev.class(), self.seq)));
        self.events.insert(self.seq, ev);
    }

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
        if let Some((node, life)) = ev.owner() {
            if !self.alive_life(node, life) {
                return;
            }
        }
        match ev {
            Ev::Tick => {
                self.tick();
                self.schedule(10, Ev::Tick);
            }
            Ev::Deliver {
                conn,
                to_replica: true,
                frame,
            } => self.deliver_to_replica(conn, frame),
            Ev::Deliver {
                conn,
                to_replica: false,
                frame,
            } => self.deliver_to_primary(conn, frame),
            Ev::CloseNow { conn, tell_replica } => {
                if self.net.close(&conn) {
                    self.closed(conn, tell_replica);
                }
            }
            Ev::ConnectDone { conn, ok } => self.connect_done(conn, ok),
            Ev::Closed { conn, tell_replica } => self.closed(conn, tell_replica),
            Ev::LocalSync { node, lsn, .. } => {
                let s = &mut self.nodes[node].store;
                s.durable = s.durable.max(lsn.min(s.head()));
                let lsn = s.durable;
                self.step(node, primary::Event::LocalDurable { lsn });
            }
            Ev::ReplicaSync { node, conn, .. } => {
                let durable = self.nodes[node].store.sync();
                let conn = ConnId(conn);
                self.step(node, replica::Event::Synced { conn, durable });
            }
            Ev::Truncate {
                node, conn, keep, ..
            } => self.truncate(node, ConnId(conn), keep),
            Ev::RebuildFinish { node, conn, .. } => {
                let s = &mut self.nodes[node].store;
                s.finish_rebuild();
                let durable = s.durable;
                let conn = ConnId(conn);
                self.step(node, replica::Event::RebuildFinished { conn, durable });
            }
            Ev::WalRead {
                node,
                replica,
                session,
                from,
                ..
            } => self.wal_read(node, replica, session, from),
            Ev::RebuildBase {
                node,
                replica,
                session,
                ..
            } => self.rebuild_base(node, replica, session),
            Ev::BaseStream {
                node,
                replica,
                session,
                ..
            } => self.stream_base(node, replica, session),
        }
    }

    pub(super) fn alive_life(&self, n: NodeId, life: u64) -> bool {
        self.nodes[n].alive && self.nodes[n].life == life
    }

    /// The replica's side of `conn`, as the replica core knows it, if that node is up.
    fn replica_end(&self, conn: &ConnKey) -> Option<(NodeId, ConnId)> {
        let cid = *self.conn_ids.get(conn)?;
        self.nodes[conn.replica]
            .alive
            .then_some((conn.replica, ConnId(cid)))
    }

    /// The primary's side of `conn` if the life that opened it still runs: the node, and the
    /// replica and session as its core knows them.
    fn primary_end(&self, conn: &ConnKey) -> Option<(NodeId, ReplicaId, SessionId)> {
        let p = conn.primary;
        if !self.alive_life(p, conn_life(conn)) {
            return None;
        }
        let replica = ReplicaId(self.nodes[conn.replica].name.clone());
        Some((p, replica, SessionId(conn_session(conn))))
    }

    fn deliver_to_replica(&mut self, conn: ConnKey, frame: Frame) {
        if !self.net.is_open(&conn) {
            return;
        }
        if let Some((n, conn)) = self.replica_end(&conn) {
            self.step(n, replica::Event::Received { conn, frame });
        }
    }

    fn deliver_to_primary(&mut self, conn: ConnKey, frame: Frame) {
        if !self.net.is_open(&conn) {
            return;
        }
        if let Some((p, replica, session)) = self.primary_end(&conn) {
            let now = self.now;
            let ev = primary::Event::Received {
                replica,
                session,
                frame,
                now,
            };
            self.step(p, ev);
        }
    }

    fn connect_done(&mut self, conn: ConnKey, ok: bool) {
        let Some((p, replica, session)) = self.primary_end(&conn) else {
            return;
        };
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
        self.step(p, ev);
    }

    fn closed(&mut self, conn: ConnKey, tell_replica: bool) {
        if tell_replica {
            if let Some((n, conn)) = self.replica_end(&conn) {
                self.step(n, replica::Event::Closed { conn });
            }
        } else if let Some((p, replica, session)) = self.primary_end(&conn) {
            let now = self.now;
            let ev = primary::Event::Disconnected {
                replica,
                session,
                now,
                reason: "connection lost".into(),
            };
            self.step(p, ev);
        }
    }

    fn truncate(&mut self, node: NodeId, conn: ConnId, keep: Lsn) {
        let s = &mut self.nodes[node].store;
        let refusal = s.truncate_after(keep).err();
        let (head, head_epoch) = (s.head(), s.head_epoch());
        if refusal.is_none() {
            self.stats.truncations += 1;
        }
        let ev = replica::Event::Truncated {
            conn,
            head,
            head_epoch,
            refusal,
        };
        self.step(node, ev);
    }

    fn wal_read(&mut self, node: NodeId, replica: ReplicaId, session: SessionId, from: Lsn) {
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
        self.step(node, ev);
    }

    fn rebuild_base(&mut self, node: NodeId, replica: ReplicaId, session: SessionId) {
        let s = &mut self.nodes[node].store;
        let base = s.image_lsn;
        s.pin = Some(s.pin.map_or(base.next(), |p| p.min(base.next())));
        let history: Vec<(Epoch, Lsn)> = s
            .history
            .iter()
            .copied()
            .filter(|(_, l)| *l <= base)
            .collect();
        let ev = primary::Event::RebuildBase {
            replica,
            session,
            base,
            history,
        };
        self.step(node, ev);
    }

    fn tick(&mut self) {
        let now = self.now;
        for n in 0..self.nodes.len() {
            if !self.nodes[n].alive {
                continue;
            }
            // Stores checkpoint now and then (which also makes their entries durable).
            if self.rng.random_bool(0.2) {
                self.checkpoint(n);
            }
            let pinned = {
                let s = &self.nodes[n].store;
                s.pin.map_or(0, |p| s.head().0.saturating_sub(p.0) + 1) * BLOCK
            };
            let ev = primary::Event::Tick {
                now,
                pinned_bytes: pinned,
            };
            self.step(n, ev);
        }
    }

    fn checkpoint(&mut self, n: NodeId) {
        // Replicated stores gate checkpoints (`Store::set_checkpoint_gate`) unless the WAL
        // fills up while they wait.
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

    /// Retention: the primary's WAL keeps every entry a recoverable replica lacks (one the
    /// primary has not released to a rebuild), judged from the replicas' last reported
    /// durable LSNs rather than from the pin the core asked for.
    fn recycled_needed_wal(&self, n: NodeId, kept: Lsn) -> Option<Violation> {
        let pn = self.nodes[n].primary()?;
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
}
