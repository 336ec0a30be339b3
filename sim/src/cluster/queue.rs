//! The event queue: what can happen at a simulated instant, ordered by time, data before
//! timers within one millisecond, then first scheduled first.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use blockrep_replication::core::replica::ConnId;
use blockrep_replication::core::{ReplicaId, SessionId};
use blockrep_replication::wire::Frame;
use blockrep_storage::Lsn;

use crate::net::{ConnKey, NodeId};

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
    /// Work node `node` started for its core is done; dropped if the node crashed or
    /// restarted since (`life` is the life that started it).
    Done {
        node: NodeId,
        life: u64,
        job: Job,
    },
    Tick,
    /// The etcd-led mode's events (see `control`).
    Control(Box<super::control::ControlEv>),
}

/// Store and network work a core asked for, which completes later.
#[derive(Debug)]
pub(super) enum Job {
    /// The primary's fsync for a FLUSH.
    LocalSync {
        lsn: Lsn,
    },
    /// A replica's fsync.
    ReplicaSync {
        conn: ConnId,
    },
    /// A replica store's cut of its log.
    Truncate {
        conn: ConnId,
        keep: Lsn,
    },
    RebuildFinish {
        conn: ConnId,
    },
    /// A catch-up read of the primary's WAL.
    WalRead {
        replica: ReplicaId,
        session: SessionId,
        from: Lsn,
    },
    /// A replica store writes its rebuild cursor.
    SaveCursor,
    /// The primary picks the base of a rebuild (the old one again, if it can).
    RebuildBase {
        replica: ReplicaId,
        session: SessionId,
        resume: Option<Lsn>,
    },
    /// The primary streams its data file to a rebuilding replica, one chunk a millisecond:
    /// the next chunk is at `at`; the stream began at `from`.
    BaseStream {
        replica: ReplicaId,
        session: SessionId,
        from: u64,
        at: u64,
    },
}

impl Ev {
    /// Data before timers within one millisecond.
    fn class(&self) -> u8 {
        u8::from(matches!(self, Ev::Tick))
    }
}

#[derive(Default)]
pub(super) struct EventQueue {
    heap: BinaryHeap<Reverse<(u64, u8, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
}

impl EventQueue {
    pub(super) fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((at, ev.class(), self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Takes the next event due by `until`, with its time.
    pub(super) fn pop_due(&mut self, until: u64) -> Option<(u64, Ev)> {
        loop {
            let Reverse((at, _, seq)) = *self.heap.peek()?;
            if at > until {
                return None;
            }
            self.heap.pop();
            if let Some(ev) = self.events.remove(&seq) {
                return Some((at, ev));
            }
        }
    }
}
