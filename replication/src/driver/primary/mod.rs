//! The primary's driver: ships the store's WAL to its replicas and answers barriers.
//!
//! The event loop, the handle and the status live here; carrying out the core's actions
//! (`actions`), a replica's connection (`conn`), the base image of a rebuild (`base`) and
//! the lag clock (`lag`) each have their own file.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockrep_storage::{Epoch, Lsn, Store};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::lag::AppendTimes;
use super::millis;
use crate::core::primary::{
    BarrierFailure, Event, PeerStatus, PrimaryConfig, PrimaryCore, PrimaryCounters,
};
use crate::core::{ReplicaId, SessionId};
use crate::wire::Frame;

mod actions;
mod base;
mod conn;
mod lag;
#[cfg(test)]
mod tests;

const TICK: Duration = Duration::from_millis(50);
/// Frames queued for one replica beyond this many bytes (or a quarter more than the WAL,
/// if that is more) mean it cannot keep up: the session is dropped and the replica recovers
/// through a new session instead of growing our memory. A replica in sync under sync-all
/// never gets there by being slow: the WAL it holds makes writers wait before its queue
/// outgrows the WAL (`PrimaryCore::enforce_retention`).
const MAX_QUEUED_BYTES: u64 = 256 << 20;
/// Entries are shipped once the oldest has waited this long, or at once when anything else
/// happens (a barrier above all). Nothing waits for an entry no barrier covers yet, so
/// shipping it a moment later costs nothing, while one frame for a millisecond of entries
/// spares the primary a wake-up of this task per write, and every replica a wake-up, a read
/// and a decode per write.
const SHIP_LINGER: Duration = Duration::from_millis(1);
/// One `Entries` frame carries at most this much (a single larger write goes alone).
const SHIP_FRAME_BYTES: u64 = 1 << 20;

enum Input {
    Event(Event),
    Barrier {
        target: Lsn,
        done: oneshot::Sender<Result<(), BarrierFailure>>,
    },
    SetAddress {
        replica: ReplicaId,
        addr: String,
    },
    SetReplicas {
        replicas: Vec<(ReplicaId, String)>,
    },
}

/// What the primary reports about replication (for status and metrics).
#[derive(Debug, Clone, Default)]
pub struct PrimaryStatus {
    pub epoch: Epoch,
    pub head: Lsn,
    pub committed: Lsn,
    pub fenced: Option<Epoch>,
    pub peers: Vec<PeerStatus>,
    /// Per peer (same order): seconds since the oldest entry it has not made durable was
    /// appended (0 when it has everything).
    pub lag_seconds: Vec<f64>,
    /// Where each replica lives now.
    pub addresses: HashMap<ReplicaId, String>,
    /// The core's clock when this was published (rebuild progress `started` is on it).
    pub now: u64,
    pub counters: PrimaryCounters,
    /// [`PrimaryCore::confirmed_at`] on the monotonic clock: when the newest ask that every
    /// replica the commit mode needs has answered at this epoch was sent (rounded down).
    pub confirmed_at: Option<std::time::Instant>,
}

/// The handle the volume uses: barriers, fencing, status.
#[derive(Clone)]
pub struct PrimaryHandle {
    tx: mpsc::UnboundedSender<Input>,
    fenced: Arc<AtomicU64>,
    status: Arc<Mutex<PrimaryStatus>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    #[error("the barrier failed: {}", .0.name())]
    Barrier(BarrierFailure),
    #[error("replication stopped")]
    Stopped,
}

impl PrimaryHandle {
    /// Resolves once `target` meets the commit mode on the replicas. The caller makes it
    /// durable locally; the driver learns that from the store (`Store::watch_durable`).
    pub async fn barrier(&self, target: Lsn) -> Result<(), ReplicationError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Input::Barrier { target, done })
            .map_err(|_| ReplicationError::Stopped)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(f)) => Err(ReplicationError::Barrier(f)),
            Err(_) => Err(ReplicationError::Stopped),
        }
    }

    /// The epoch that fenced this primary, if one did: from then on it must refuse writes.
    pub fn fenced(&self) -> Option<Epoch> {
        match self.fenced.load(Ordering::Acquire) {
            0 => None,
            e => Some(Epoch(e)),
        }
    }

    /// Points a replica at a new address (it keeps its identity and progress).
    pub fn set_address(&self, replica: ReplicaId, addr: String) {
        let _ = self.tx.send(Input::SetAddress { replica, addr });
    }

    /// Replicates to `replicas` (identity, address) from now on, in place: members that stay
    /// keep their sessions and progress, one that leaves stops counting at once (so its
    /// caller must only drop a replica the commit promise can do without), and one that
    /// joins is dialled. FLUSHes in flight are not disturbed.
    pub fn set_replicas(&self, replicas: Vec<(ReplicaId, String)>) {
        let _ = self.tx.send(Input::SetReplicas { replicas });
    }

    /// Resolves once the driver has stopped (after its shutdown token, or if it failed):
    /// from then on it sends nothing more to any replica and holds the store no longer.
    pub async fn stopped(&self) {
        self.tx.closed().await;
    }

    pub fn status(&self) -> PrimaryStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The transport of one replica's session.
/// The transport of one replica's session (opened in `conn`).
struct Conn {
    session: SessionId,
    /// Frames for the writer task, in order.
    tx: mpsc::UnboundedSender<Frame>,
    /// Bytes of frames queued and not yet written (see `MAX_QUEUED_BYTES`).
    queued: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
}

impl Conn {
    /// Ends the session's transport: the reader stops, and with the last sender gone the
    /// writer too.
    fn end(self) {
        self.reader.abort();
    }
}

/// Starts replication for `store` (which must already be serving at `cfg.epoch`) on the
/// current tokio runtime.
pub fn start(
    store: Arc<Store>,
    cfg: PrimaryConfig,
    addrs: HashMap<ReplicaId, String>,
    shutdown: CancellationToken,
) -> PrimaryHandle {
    start_with_tls(store, cfg, addrs, None, shutdown)
}

/// Like [`start`]; with `tls`, every replica is dialed over mutual TLS and must present
/// the certificate of its name.
pub fn start_with_tls(
    store: Arc<Store>,
    cfg: PrimaryConfig,
    addrs: HashMap<ReplicaId, String>,
    tls: Option<crate::driver::tls::PeerTls>,
    shutdown: CancellationToken,
) -> PrimaryHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let fenced = Arc::new(AtomicU64::new(0));
    let status = Arc::new(Mutex::new(PrimaryStatus::default()));
    let handle = PrimaryHandle {
        tx: tx.clone(),
        fenced: fenced.clone(),
        status: status.clone(),
    };
    let start = tokio::time::Instant::now();
    let core = PrimaryCore::new(
        cfg,
        store.head(),
        store.epoch_history(),
        store.committed(),
        store.oldest_retained(),
        0,
    );
    // Before the first checkpoint can recycle what the replicas may need.
    let pin = core.pin();
    store.set_retention_pin(pin);
    let max_queued = MAX_QUEUED_BYTES.max(store.superblock().wal_capacity / 4 * 5);
    let driver = Driver {
        max_queued,
        tap: store.subscribe(),
        durable: store.watch_durable(),
        store,
        core,
        addrs,
        conns: HashMap::new(),
        barriers: HashMap::new(),
        next_barrier: 1,
        pin,
        in_tx: tx,
        fenced,
        status,
        start,
        last_logged: HashMap::new(),
        full_said: HashSet::new(),
        appended_at: AppendTimes::default(),
        tls,
    };
    tokio::spawn(driver.run(rx, shutdown));
    handle
}

struct Driver {
    store: Arc<Store>,
    /// Bytes of frames one replica's queue may hold (see [`MAX_QUEUED_BYTES`]).
    max_queued: u64,
    tap: mpsc::UnboundedReceiver<blockrep_storage::WalRecord>,
    /// The store's durable LSN as it moves: the one source of the primary's own durability.
    /// The WAL writer publishes it before it wakes the FLUSH that waited for it, so a
    /// barrier learns of the local fsync no later than the FLUSH itself does.
    durable: tokio::sync::watch::Receiver<Lsn>,
    core: PrimaryCore,
    addrs: HashMap<ReplicaId, String>,
    conns: HashMap<ReplicaId, Conn>,
    barriers: HashMap<u64, oneshot::Sender<Result<(), BarrierFailure>>>,
    next_barrier: u64,
    pin: Option<Lsn>,
    in_tx: mpsc::UnboundedSender<Input>,
    fenced: Arc<AtomicU64>,
    status: Arc<Mutex<PrimaryStatus>>,
    start: tokio::time::Instant,
    last_logged: HashMap<ReplicaId, String>,
    /// Replicas whose full filesystem was said; their retry cycle logs at debug.
    full_said: HashSet<ReplicaId>,
    appended_at: AppendTimes,
    /// Mutual TLS to the replicas, when the node has it.
    tls: Option<crate::driver::tls::PeerTls>,
}

impl Driver {
    async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<Input>,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(256);
        // Entries taken from the tap, not yet handed to the core.
        let mut shipping = Vec::new();
        let linger = tokio::time::sleep(SHIP_LINGER);
        tokio::pin!(linger);
        // What is durable already counts from the start.
        self.durable.mark_changed();
        loop {
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // While entries linger the tap is left alone: appends then wake no one.
                n = self.tap.recv_many(&mut batch, 256), if shipping.is_empty() => {
                    if n == 0 {
                        break; // the store closed
                    }
                    linger.as_mut().reset(tokio::time::Instant::now() + SHIP_LINGER);
                    shipping.append(&mut batch);
                    continue;
                }
                _ = &mut linger, if !shipping.is_empty() => {
                    self.drain_tap(&mut shipping);
                    self.ship(&mut shipping);
                    continue;
                }
                Ok(()) = self.durable.changed() => {
                    Event::LocalDurable { lsn: *self.durable.borrow_and_update() }
                }
                Some(input) = inputs.recv() => match input {
                    Input::Event(e) => e,
                    Input::Barrier { target, done } => {
                        let id = self.next_barrier;
                        self.next_barrier += 1;
                        self.barriers.insert(id, done);
                        Event::Barrier { id, target, now: millis(self.start) }
                    }
                    Input::SetAddress { replica, addr } => {
                        tracing::info!(%replica, %addr, "replica address updated");
                        self.addrs.insert(replica, addr);
                        continue;
                    }
                    Input::SetReplicas { replicas } => self.members_changed(replicas),
                },
                _ = ticker.tick() => {
                    self.drain_tap(&mut shipping);
                    self.ship(&mut shipping);
                    let pinned_bytes = self.pin.map_or(0, |p| self.store.wal_bytes_since(p));
                    Event::Tick { now: millis(self.start), pinned_bytes }
                }
            };
            // Every entry appended before this event reaches the core first: a barrier
            // must never overtake the entries it covers, and no other event may find the
            // core behind the store by more than the channel's own delay.
            self.drain_tap(&mut shipping);
            self.ship(&mut shipping);
            self.step(event);
        }
        for (_, c) in self.conns.drain() {
            c.end();
        }
    }

    /// The event that tells the core who the replicas are now; the addresses and the
    /// transports of members that left go with it.
    fn members_changed(&mut self, replicas: Vec<(ReplicaId, String)>) -> Event {
        let ids: Vec<ReplicaId> = replicas.iter().map(|(id, _)| id.clone()).collect();
        self.addrs = replicas.into_iter().collect();
        let gone: Vec<ReplicaId> = self
            .conns
            .keys()
            .filter(|id| !self.addrs.contains_key(*id))
            .cloned()
            .collect();
        for id in &gone {
            self.end_conn(id);
        }
        self.last_logged.retain(|id, _| self.addrs.contains_key(id));
        self.full_said.retain(|id| self.addrs.contains_key(id));
        Event::SetReplicas {
            replicas: ids,
            kept_from: self.store.oldest_retained(),
            now: millis(self.start),
        }
    }

    /// Takes whatever the tap holds right now, without waiting.
    fn drain_tap(&mut self, shipping: &mut Vec<blockrep_storage::WalRecord>) {
        while let Ok(record) = self.tap.try_recv() {
            shipping.push(record);
        }
    }

    /// Hands the entries collected so far to the core, which sends them to the replicas.
    fn ship(&mut self, shipping: &mut Vec<blockrep_storage::WalRecord>) {
        for records in frame_batches(std::mem::take(shipping), SHIP_FRAME_BYTES) {
            if let Some(last) = records.last() {
                self.appended_at.note(last.lsn, self.core.min_durable());
            }
            self.step(Event::Appended { records });
        }
    }

    /// Runs one event through the core and carries out its actions.
    fn step(&mut self, event: Event) {
        // Appends are the hot path; the status is refreshed by every other event and by the
        // tick (every 50 ms) anyway.
        let quiet = matches!(event, Event::Appended { .. });
        let actions = self.core.step(event);
        // Published before the actions run: a client whose FLUSH the actions answer must find
        // the status (committed LSN, peers) already saying so.
        if !quiet {
            self.publish();
            self.store.set_checkpoint_gate(self.core.checkpoint_gate());
        }
        for action in actions {
            self.execute(action);
        }
    }

    fn publish(&self) {
        let peers = self.core.peers();
        let head = self.core.head();
        let lag_seconds = peers
            .iter()
            .map(|p| self.appended_at.lag_seconds(p.durable, head))
            .collect();
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.epoch = self.core.epoch();
        s.head = self.core.head();
        s.committed = self.core.committed();
        s.fenced = self.core.fenced();
        s.peers = peers;
        s.lag_seconds = lag_seconds;
        s.addresses = self.addrs.clone();
        s.now = millis(self.start);
        s.counters = self.core.counters().clone();
        // The core's millis are rounded down from `start`, so this is never later than the
        // true send time.
        s.confirmed_at = self
            .core
            .confirmed_at()
            .map(|ms| (self.start + Duration::from_millis(ms)).into_std());
    }
}

/// Cuts `records` (in order) into batches of at most `max_bytes` (payloads and entry
/// headers), one per `Entries` frame, so that no frame outgrows what a replica accepts; an
/// entry larger than that goes alone.
fn frame_batches(
    records: Vec<blockrep_storage::WalRecord>,
    max_bytes: u64,
) -> Vec<Vec<blockrep_storage::WalRecord>> {
    let mut batches: Vec<Vec<blockrep_storage::WalRecord>> = Vec::new();
    let mut bytes = 0;
    for r in records {
        let len = r.payload.len() as u64 + crate::wire::ENTRY_HEADER_LEN as u64;
        match batches.last_mut() {
            Some(b) if bytes + len <= max_bytes => b.push(r),
            _ => {
                bytes = 0;
                batches.push(vec![r]);
            }
        }
        bytes += len;
    }
    batches
}
