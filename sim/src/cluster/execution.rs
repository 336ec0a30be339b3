//! Performing what the cores ask for: every event reaches a core through [`Cluster::step`],
//! and every action it returns is carried out here, on the simulated network, stores and
//! client, in the order the core gave them.

use std::ops::ControlFlow;

use blockrep_replication::core::primary;
use blockrep_replication::core::replica;
use blockrep_replication::core::{ReplicaId, SessionId};
use blockrep_replication::wire::{Body, Frame};
use blockrep_storage::{Epoch, Lsn};
use bytes::Bytes;

use super::queue::{Ev, Job};
use super::{Cluster, FlushOutcome};
use crate::check::Violation;
use crate::net::{ConnKey, NodeId};
use crate::node::Role;
use crate::store::{Entry, BLOCK};

/// An event for one of the two cores.
pub(super) enum Input {
    Primary(primary::Event),
    Replica(replica::Event),
}

impl From<primary::Event> for Input {
    fn from(ev: primary::Event) -> Input {
        Input::Primary(ev)
    }
}

impl From<replica::Event> for Input {
    fn from(ev: replica::Event) -> Input {
        Input::Replica(ev)
    }
}

/// The (block, value) pairs of a base chunk at byte `offset`: 8 bytes of value per block.
fn base_values(offset: u64, data: Option<Bytes>) -> Vec<(u64, u64)> {
    let first = offset / BLOCK;
    data.map(|d| {
        d.chunks(8)
            .enumerate()
            .map(|(i, c)| {
                let mut v = [0u8; 8];
                v[..c.len()].copy_from_slice(c);
                (first + i as u64, u64::from_le_bytes(v))
            })
            .collect()
    })
    .unwrap_or_default()
}

impl Cluster {
    /// Steps node `n`'s core with `input` and performs the actions it returns. An input for
    /// a core the node no longer runs (it crashed, or changed role) is dropped.
    pub(super) fn step(&mut self, n: NodeId, input: impl Into<Input>) {
        match (&mut self.nodes[n].role, input.into()) {
            (Some(Role::Primary(pn)), Input::Primary(ev)) => {
                let actions = pn.core.step(ev);
                self.primary_actions(n, actions);
            }
            (Some(Role::Replica(core)), Input::Replica(ev)) => {
                let actions = core.step(ev);
                self.replica_actions(n, actions);
            }
            _ => {}
        }
    }

    // ---- the primary's actions ---------------------------------------------------------

    fn primary_actions(&mut self, p: NodeId, actions: Vec<primary::Action>) {
        for a in actions {
            self.primary_action(p, a);
        }
    }

    fn primary_action(&mut self, p: NodeId, a: primary::Action) {
        use primary::Action as A;
        match a {
            A::Connect { replica, session } => self.connect(p, &replica, session),
            A::Send {
                replica,
                session,
                frame,
            } => {
                if let Some(k) = self.conn_key(p, &replica, session) {
                    self.send(k, true, frame);
                }
            }
            A::Close {
                replica, session, ..
            } => {
                if let Some(k) = self.conn_key(p, &replica, session) {
                    self.close_after_queued(k, true);
                }
            }
            A::ReadWal {
                replica,
                session,
                from,
                ..
            } => self.network_job(
                p,
                Job::WalRead {
                    replica,
                    session,
                    from,
                },
            ),
            A::PinWal { from } => self.nodes[p].store.pin = from,
            A::BeginRebuild {
                replica,
                session,
                resume,
            } => {
                self.stats.rebuilds += 1;
                let job = Job::RebuildBase {
                    replica,
                    session,
                    resume,
                };
                self.network_job(p, job);
            }
            A::StreamBase {
                replica,
                session,
                from,
                ..
            } => {
                let job = Job::BaseStream {
                    replica,
                    session,
                    from,
                    at: from,
                };
                self.network_job(p, job);
            }
            A::BarrierDone { id } => self.barrier_done(p, id),
            A::BarrierFailed { id, reason } => {
                if let Some(pn) = self.nodes[p].primary_mut() {
                    pn.barriers.remove(&id);
                }
                self.outcomes
                    .insert(id, FlushOutcome::Failed(reason.name().to_string()));
                self.stats.flushes_failed += 1;
                let name = &self.nodes[p].name;
                self.log(format!("flush failed on {name}: {}", reason.name()));
            }
            A::Committed { lsn } => self.committed(p, lsn),
            A::Fenced { epoch, reason } => {
                let name = self.nodes[p].name.clone();
                self.log(format!("{name} fenced by epoch {epoch}: {reason}"));
            }
            A::StateChanged {
                replica,
                state,
                why,
                out_of_space: _,
            } => {
                if state == primary::PeerState::CatchingUp {
                    self.stats.catch_ups += 1;
                }
                let name = self.nodes[p].name.clone();
                self.log(format!("{name}: {replica} -> {} ({why})", state.name()));
            }
        }
    }

    /// Dials a replica: the connection succeeds if the replica is up, reachable and serving
    /// as a replica when the primary asks.
    fn connect(&mut self, p: NodeId, replica: &ReplicaId, session: SessionId) {
        let Some(k) = self.conn_key(p, replica, session) else {
            return;
        };
        let cid = self.next_conn;
        self.next_conn += 1;
        self.conn_ids.insert(k, cid);
        self.conn_keys.insert(cid, k);
        let r = k.replica;
        let ok = self.nodes[r].alive && self.net.connected(p, r) && self.nodes[r].is_replica();
        let d = self.delay();
        self.schedule(d, Ev::ConnectDone { conn: k, ok });
    }

    /// The client's flush `id` was acknowledged: the checker verifies the promise.
    fn barrier_done(&mut self, p: NodeId, id: u64) {
        if self.flush_gate(p, id) {
            self.acknowledge_barrier(p, id);
        }
    }

    /// Sends the acknowledgement of flush `id` (past the etcd-led mode's gate, if on).
    pub(super) fn acknowledge_barrier(&mut self, p: NodeId, id: u64) {
        let Some(target) = self.nodes[p]
            .primary_mut()
            .and_then(|pn| pn.barriers.remove(&id))
        else {
            return;
        };
        self.outcomes.insert(id, FlushOutcome::Acked);
        self.stats.flushes_ok += 1;
        let v = self
            .checker
            .flush_acked(p, target, &self.nodes, self.replica_set(p));
        self.log(format!(
            "flush through {target} acknowledged by {}",
            self.nodes[p].name
        ));
        self.fail_on(v);
    }

    /// Invariant: the committed LSN a primary reports never goes down within its life.
    fn committed(&mut self, p: NodeId, lsn: Lsn) {
        let node = &mut self.nodes[p];
        node.store.committed = node.store.committed.max(lsn);
        if let Some(pn) = node.primary_mut() {
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

    // ---- the replica's actions ---------------------------------------------------------

    pub(super) fn replica_actions(&mut self, n: NodeId, actions: Vec<replica::Action>) {
        for a in actions {
            if let ControlFlow::Break(refused) = self.replica_action(n, a) {
                // As the driver does: the rest of the batch is skipped, then the core hears
                // that the store refused it.
                if let Some(event) = refused {
                    self.step(n, event);
                }
                return;
            }
        }
    }

    /// A full store refuses what it is handed (as the driver tells its core).
    fn refused_for_space(&mut self, n: NodeId) -> ControlFlow<Option<replica::Event>> {
        self.stats.refused_for_space += 1;
        let store = &self.nodes[n].store;
        ControlFlow::Break(Some(replica::Event::StoreRefused {
            head: store.head(),
            head_epoch: store.head_epoch(),
            no_space: true,
            message: "the filesystem is full".into(),
        }))
    }

    /// Performs one action; `Break` when the rest of the batch must not run, with the event
    /// the core is to hear about it, if any.
    fn replica_action(
        &mut self,
        n: NodeId,
        a: replica::Action,
    ) -> ControlFlow<Option<replica::Event>> {
        use replica::Action as A;
        let full = self.nodes[n].full;
        match a {
            A::Append { .. } if full => return self.refused_for_space(n),
            A::ApplyBase { data: Some(_), .. } if full => return self.refused_for_space(n),
            A::Send { conn, frame } => {
                if let Some(&k) = self.conn_keys.get(&conn.0) {
                    self.send(k, false, frame);
                }
            }
            A::Close { conn, .. } => {
                if let Some(&k) = self.conn_keys.get(&conn.0) {
                    self.close_after_queued(k, false);
                }
            }
            A::AdoptVolume { volume_id } => self.nodes[n].store.volume_id = volume_id,
            A::AdoptEpoch { epoch, owner } => {
                let s = &mut self.nodes[n].store;
                s.epoch = epoch;
                s.epoch_owner = owner;
                s.role = crate::store::StoreRole::Replica;
            }
            A::Append { record } => return self.replica_append(n, Entry::from_record(&record)),
            // An fsync makes everything appended durable, whatever LSN the core waits for.
            A::Sync { conn, .. } => self.disk_job(n, Job::ReplicaSync { conn }),
            A::SetCommitted { lsn } => {
                let s = &mut self.nodes[n].store;
                s.committed = s.committed.max(lsn);
                s.keep_wal_after_committed();
            }
            A::BeginRebuild {
                base,
                history,
                resume,
            } => {
                self.nodes[n].store.begin_rebuild(base, history, resume);
            }
            A::ApplyBase {
                offset,
                length,
                reflects,
                data,
            } => {
                let values = base_values(offset, data);
                self.nodes[n]
                    .store
                    .apply_base(&values, offset + length, reflects);
                self.disk_job(n, Job::SaveCursor);
            }
            A::Truncate { conn, keep } => self.disk_job(n, Job::Truncate { conn, keep }),
            A::FinishRebuild { conn, .. } => self.disk_job(n, Job::RebuildFinish { conn }),
        }
        ControlFlow::Continue(())
    }

    /// Appends on a replica store, which refuses an entry that does not follow its head.
    fn replica_append(&mut self, n: NodeId, e: Entry) -> ControlFlow<Option<replica::Event>> {
        let node = &mut self.nodes[n];
        if e.lsn != node.store.head().next() {
            // Only a mutant accepting gaps gets here: the store would refuse it.
            let v = Violation::new(
                "a replica accepted an entry with an LSN gap",
                format!("{} got {} after {}", node.name, e.lsn, node.store.head()),
            );
            self.checker.violations.push(v);
            return ControlFlow::Break(None);
        }
        node.store.append(e);
        ControlFlow::Continue(())
    }

    /// A job on node `n` that takes a network round trip.
    fn network_job(&mut self, n: NodeId, job: Job) {
        let d = self.delay();
        self.schedule_job(d, n, job);
    }

    /// A job on node `n`'s store that takes an fsync.
    pub(super) fn disk_job(&mut self, n: NodeId, job: Job) {
        let d = self.disk_delay();
        self.schedule_job(d, n, job);
    }

    // ---- the network -------------------------------------------------------------------

    fn conn_key(&self, p: NodeId, replica: &ReplicaId, session: SessionId) -> Option<ConnKey> {
        let pn = self.nodes[p].primary()?;
        let r = pn.peers.iter().find(|(id, _)| id == replica)?.1;
        Some(ConnKey::new(p, r, self.nodes[p].life, session.0))
    }

    /// The configured replicas of primary `p`, by node.
    fn replica_set(&self, p: NodeId) -> Vec<NodeId> {
        match self.nodes[p].primary() {
            Some(pn) => pn.peers.iter().map(|(_, n)| *n).collect(),
            None => Vec::new(),
        }
    }

    /// Like TCP's FIN: the other side sees the close after every frame already sent.
    fn close_after_queued(&mut self, k: ConnKey, tell_replica: bool) {
        let ev = Ev::CloseNow {
            conn: k,
            tell_replica,
        };
        self.behind_sent_frames(k, 1, ev);
    }

    fn send(&mut self, k: ConnKey, to_replica: bool, frame: Frame) {
        let ev = Ev::Deliver {
            conn: k,
            to_replica,
            frame,
        };
        self.behind_sent_frames(k, 0, ev);
    }

    /// Schedules `ev` on open connection `k` after a network delay, never before what was
    /// sent on it earlier (FIFO), `extra` ms after that; on a closed connection it is lost.
    fn behind_sent_frames(&mut self, k: ConnKey, extra: u64, ev: Ev) {
        let d = self.delay();
        let now = self.now;
        if let Some(at) = self.net.schedule(&k, now, d) {
            self.schedule(at - now + extra, ev);
        }
    }

    /// Streams one chunk (8 blocks) of primary `p`'s data file, from block `at / BLOCK`, to a
    /// rebuilding replica, and the next a millisecond later; a resumed stream begins at
    /// `from`, past what the replica's cursor holds.
    pub(super) fn stream_base(
        &mut self,
        p: NodeId,
        replica: ReplicaId,
        session: SessionId,
        (from, at): (u64, u64),
    ) {
        let Some(k) = self.conn_key(p, &replica, session) else {
            return;
        };
        let epoch: Epoch = self.nodes[p].store.epoch;
        let blocks = self.cfg.blocks;
        let b = at / BLOCK;
        if b < blocks {
            // The data file as it is now: it may be newer than the base; WAL wins makes that
            // safe. It reflects no entry after the image's LSN.
            let s = &self.nodes[p].store;
            let n = 8.min(blocks - b);
            let mut data = Vec::with_capacity(n as usize * 8);
            for i in b..b + n {
                data.extend_from_slice(&s.image.get(&i).copied().unwrap_or(0).to_le_bytes());
            }
            let frame = Frame {
                epoch,
                body: Body::BaseChunk {
                    offset: b * BLOCK,
                    length: n * BLOCK,
                    reflects: s.image_lsn,
                    data: Some(Bytes::from(data)),
                },
            };
            self.send(k, true, frame);
            let next = (b + n) * BLOCK;
            let progress = primary::Event::BaseProgress {
                replica: replica.clone(),
                session,
                done: next,
                total: blocks * BLOCK,
                sent: next - from,
            };
            self.step(p, progress);
            let job = Job::BaseStream {
                replica,
                session,
                from,
                at: next,
            };
            self.schedule_job(1, p, job);
            return;
        }
        self.step(p, primary::Event::BaseSent { replica, session });
    }
}
