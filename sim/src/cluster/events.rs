//! What each event does to the node it reaches (the queue itself is `queue`). An event for
//! an earlier life of a node, or for a core the node no longer runs, is dropped.

use blockrep_replication::core::primary::{self, RebuildRestart};
use blockrep_replication::core::replica::{self, ConnId};
use blockrep_replication::core::{ReplicaId, SessionId};
use blockrep_replication::wire::Frame;
use blockrep_storage::{Epoch, Lsn};
use rand::RngExt;

use super::queue::{Ev, Job};
use super::Cluster;
use crate::check::Violation;
use crate::net::{ConnKey, NodeId};
use crate::node::Role;
use crate::store::BLOCK;

impl Cluster {
    pub(super) fn schedule(&mut self, delay: u64, ev: Ev) {
        self.queue.push(self.now + delay, ev);
    }

    /// Schedules `job` for the current life of `node`, done after `delay`.
    pub(super) fn schedule_job(&mut self, delay: u64, node: NodeId, job: Job) {
        let life = self.nodes[node].life;
        self.schedule(delay, Ev::Done { node, life, job });
    }

    /// Runs everything due by `until`.
    pub fn run_until(&mut self, until: u64) {
        while let Some((at, ev)) = self.queue.pop_due(until) {
            self.now = at;
            self.handle(ev);
            if !self.checker.violations.is_empty() {
                return;
            }
        }
        self.now = until;
    }

    fn handle(&mut self, ev: Ev) {
        // A paused (SIGSTOPped) node's events wait for it to resume.
        if let Some(resume) = self.held_until(&ev) {
            self.queue.push(resume, ev);
            return;
        }
        match ev {
            Ev::Control(ev) => self.control_event(*ev),
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
            Ev::Done { node, life, job } => {
                if self.alive_life(node, life) {
                    self.job_done(node, job);
                }
            }
        }
    }

    fn job_done(&mut self, node: NodeId, job: Job) {
        match job {
            Job::LocalSync { lsn } => {
                let s = &mut self.nodes[node].store;
                s.durable = s.durable.max(lsn.min(s.head()));
                let lsn = s.durable;
                self.step(node, primary::Event::LocalDurable { lsn });
            }
            Job::ReplicaSync { conn } => {
                let durable = self.nodes[node].store.sync();
                self.step(node, replica::Event::Synced { conn, durable });
            }
            Job::Truncate { conn, keep } => self.truncate(node, conn, keep),
            Job::RebuildFinish { conn } => {
                let s = &mut self.nodes[node].store;
                s.finish_rebuild();
                let durable = s.durable;
                self.step(node, replica::Event::RebuildFinished { conn, durable });
            }
            Job::WalRead {
                replica,
                session,
                from,
            } => self.wal_read(node, replica, session, from),
            Job::SaveCursor => {
                if let Some(cursor) = self.nodes[node].store.save_cursor() {
                    let cursor = Some(cursor);
                    self.step(node, replica::Event::CursorSaved { cursor });
                }
            }
            Job::RebuildBase {
                replica,
                session,
                resume,
            } => self.rebuild_base(node, replica, session, resume),
            Job::BaseStream {
                replica,
                session,
                from,
                at,
            } => self.stream_base(node, replica, session, (from, at)),
        }
    }

    fn alive_life(&self, n: NodeId, life: u64) -> bool {
        self.nodes[n].alive && self.nodes[n].life == life
    }

    /// Steps the replica's side of `conn` (the replica core knows it by its ConnId), if that
    /// node is up.
    fn step_replica_end(&mut self, conn: &ConnKey, ev: impl FnOnce(ConnId) -> replica::Event) {
        let Some(&cid) = self.conn_ids.get(conn) else {
            return;
        };
        if self.nodes[conn.replica].alive {
            self.step(conn.replica, ev(ConnId(cid)));
        }
    }

    /// Whether the primary life that opened `conn` still runs.
    fn primary_end_alive(&self, conn: &ConnKey) -> bool {
        self.alive_life(conn.primary, conn.life())
    }

    /// Steps the primary's side of `conn` (its core knows it by replica and session), if the
    /// life that opened it still runs; `ev` also gets the time.
    fn step_primary_end(
        &mut self,
        conn: &ConnKey,
        ev: impl FnOnce(ReplicaId, SessionId, u64) -> primary::Event,
    ) {
        if !self.primary_end_alive(conn) {
            return;
        }
        let replica = ReplicaId(self.nodes[conn.replica].name.clone());
        let ev = ev(replica, SessionId(conn.session_number()), self.now);
        self.step(conn.primary, ev);
    }

    fn deliver_to_replica(&mut self, conn: ConnKey, frame: Frame) {
        if self.net.is_open(&conn) {
            self.step_replica_end(&conn, |conn| replica::Event::Received { conn, frame });
        }
    }

    fn deliver_to_primary(&mut self, conn: ConnKey, frame: Frame) {
        if self.net.is_open(&conn) {
            self.step_primary_end(&conn, |replica, session, now| primary::Event::Received {
                replica,
                session,
                frame,
                now,
            });
        }
    }

    fn connect_done(&mut self, conn: ConnKey, ok: bool) {
        if !self.primary_end_alive(&conn) {
            return;
        }
        if ok {
            self.net.open(conn, self.now);
            self.step_primary_end(&conn, |replica, session, now| primary::Event::Connected {
                replica,
                session,
                now,
            });
        } else {
            self.disconnected(&conn, "connection refused");
        }
    }

    fn closed(&mut self, conn: ConnKey, tell_replica: bool) {
        if tell_replica {
            self.step_replica_end(&conn, |conn| replica::Event::Closed { conn });
        } else {
            self.disconnected(&conn, "connection lost");
        }
    }

    fn disconnected(&mut self, conn: &ConnKey, reason: &str) {
        self.step_primary_end(conn, |replica, session, now| primary::Event::Disconnected {
            replica,
            session,
            now,
            reason: reason.into(),
        });
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

    /// `Store::resume_base` when asked to resume and the WAL after that base is still
    /// there, `Store::rebuild_base` otherwise.
    fn rebuild_base(
        &mut self,
        node: NodeId,
        replica: ReplicaId,
        session: SessionId,
        resume: Option<Lsn>,
    ) {
        let s = &mut self.nodes[node].store;
        let refused = resume.and_then(|b| {
            if s.image_lsn < b {
                Some(RebuildRestart::OlderImage)
            } else if b > s.head() || s.retained_from > b.next() {
                Some(RebuildRestart::WalRecycled)
            } else {
                None
            }
        });
        let kept = resume.filter(|_| refused.is_none());
        let base = kept.unwrap_or(s.image_lsn);
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
            resumed: kept.is_some(),
            refused,
        };
        self.step(node, ev);
    }

    fn tick(&mut self) {
        let now = self.now;
        for n in 0..self.nodes.len() {
            if !self.nodes[n].alive || self.is_paused(n) {
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
