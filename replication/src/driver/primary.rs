//! The primary's driver: ships the store's WAL to its replicas and answers barriers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockrep_storage::{Epoch, Lsn, StorageError, Store};
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::{millis, FrameCodec, CONNECT_TIMEOUT};
use crate::core::primary::{
    Action, BarrierFailure, Event, PeerState, PeerStatus, PrimaryConfig, PrimaryCore,
    PrimaryCounters,
};
use crate::core::{ReplicaId, SessionId};
use crate::wire::Frame;

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
/// How often a running rebuild reports its progress, at the least.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

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
    /// Resolves once `target` meets the commit mode on the replicas (the caller makes it
    /// durable locally and reports that with [`PrimaryHandle::local_durable`]).
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

    /// The primary's own WAL is durable through `lsn`.
    pub fn local_durable(&self, lsn: Lsn) {
        let _ = self.tx.send(Input::Event(Event::LocalDurable { lsn }));
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

    pub fn status(&self) -> PrimaryStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

struct Conn {
    session: SessionId,
    tx: mpsc::UnboundedSender<Frame>,
    queued: Arc<AtomicU64>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// Starts replication for `store` (which must already be serving at `cfg.epoch`) on the
/// current tokio runtime.
pub fn start(
    store: Arc<Store>,
    cfg: PrimaryConfig,
    addrs: HashMap<ReplicaId, String>,
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
        appended_at: std::collections::VecDeque::new(),
    };
    tokio::spawn(driver.run(rx, shutdown));
    handle
}

struct Driver {
    store: Arc<Store>,
    /// Bytes of frames one replica's queue may hold (see [`MAX_QUEUED_BYTES`]).
    max_queued: u64,
    tap: mpsc::UnboundedReceiver<blockrep_storage::WalRecord>,
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
    /// When entries were appended (the last LSN of each batch, sampled): the age of the
    /// oldest entry a replica lacks is its lag in seconds.
    appended_at: std::collections::VecDeque<(Lsn, tokio::time::Instant)>,
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
                },
                _ = ticker.tick() => {
                    self.drain_tap(&mut shipping);
                    self.ship(&mut shipping);
                    // Feed the local durability we have anyway, then let time act.
                    let durable = self.store.durable();
                    self.step(Event::LocalDurable { lsn: durable });
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
            if let Some(r) = c.reader {
                r.abort();
            }
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
                self.note_appended(last.lsn);
            }
            self.step(Event::Appended { records });
        }
    }

    fn note_appended(&mut self, lsn: Lsn) {
        const MAX_SAMPLES: usize = 100_000;
        let now = tokio::time::Instant::now();
        // One sample per millisecond is plenty for a lag in seconds.
        if self
            .appended_at
            .back()
            .is_none_or(|(_, t)| now.duration_since(*t) >= Duration::from_millis(1))
        {
            self.appended_at.push_back((lsn, now));
        } else if let Some(last) = self.appended_at.back_mut() {
            last.0 = lsn;
        }
        // Forget what every replica already has (and bound the memory either way).
        let min_durable = self.core.min_durable();
        while self.appended_at.len() > MAX_SAMPLES
            || self
                .appended_at
                .front()
                .zip(min_durable)
                .is_some_and(|((l, _), d)| *l <= d)
        {
            self.appended_at.pop_front();
        }
    }

    /// Seconds since the first entry after `durable` was appended.
    fn lag_seconds(&self, durable: Lsn) -> f64 {
        if durable >= self.core.head() {
            return 0.0;
        }
        let first_missing = self.appended_at.iter().find(|(l, _)| *l > durable);
        first_missing.map_or(0.0, |(_, t)| t.elapsed().as_secs_f64())
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
        let lag_seconds = peers.iter().map(|p| self.lag_seconds(p.durable)).collect();
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
    }

    fn execute(&mut self, action: Action) {
        match action {
            Action::Connect { replica, session } => self.connect(replica, session),
            Action::Send {
                replica,
                session,
                frame,
            } => {
                let Some(c) = self.conns.get(&replica).filter(|c| c.session == session) else {
                    return;
                };
                let size = frame.queued_size();
                if c.queued.load(Ordering::Relaxed) + size > self.max_queued {
                    let _ = self.in_tx.send(Input::Event(Event::Disconnected {
                        replica,
                        session,
                        now: millis(self.start),
                        reason: "replica cannot keep up (send queue full)".into(),
                    }));
                    return;
                }
                c.queued.fetch_add(size, Ordering::Relaxed);
                let _ = c.tx.send(frame);
            }
            Action::Close {
                replica,
                session,
                reason,
            } => {
                if self
                    .conns
                    .get(&replica)
                    .is_some_and(|c| c.session == session)
                {
                    if let Some(c) = self.conns.remove(&replica) {
                        if let Some(r) = c.reader {
                            r.abort();
                        }
                    }
                    tracing::debug!(%replica, %session, "replication session closed: {reason}");
                }
            }
            Action::ReadWal {
                replica,
                session,
                from,
                max_bytes,
            } => {
                let store = self.store.clone();
                let tx = self.in_tx.clone();
                let start = self.start;
                tokio::spawn(async move {
                    let event = match store.read_wal(from, max_bytes).await {
                        Ok(records) => Event::WalRead {
                            replica,
                            session,
                            from,
                            records,
                            now: millis(start),
                        },
                        Err(StorageError::WalRecycled { .. }) => Event::WalGone {
                            replica,
                            session,
                            from,
                            now: millis(start),
                        },
                        Err(e) => Event::Disconnected {
                            replica,
                            session,
                            now: millis(start),
                            reason: format!("cannot read the WAL: {e}"),
                        },
                    };
                    let _ = tx.send(Input::Event(event));
                });
            }
            Action::BeginRebuild { replica, session } => {
                let store = self.store.clone();
                let tx = self.in_tx.clone();
                tokio::spawn(async move {
                    if let Ok((base, history)) =
                        tokio::task::spawn_blocking(move || store.rebuild_base()).await
                    {
                        let _ = tx.send(Input::Event(Event::RebuildBase {
                            replica,
                            session,
                            base,
                            history,
                        }));
                    }
                });
            }
            Action::StreamBase {
                replica,
                session,
                base,
                rate,
            } => {
                let Some(c) = self.conns.get(&replica).filter(|c| c.session == session) else {
                    return;
                };
                tracing::info!(%replica, "streaming the base image (checkpoint {base})");
                tokio::spawn(stream_base(
                    self.store.clone(),
                    c.tx.clone(),
                    c.queued.clone(),
                    self.in_tx.clone(),
                    replica,
                    session,
                    rate,
                ));
            }
            Action::PinWal { from } => {
                self.pin = from;
                self.store.set_retention_pin(from);
            }
            Action::BarrierDone { id } => {
                if let Some(done) = self.barriers.remove(&id) {
                    let _ = done.send(Ok(()));
                }
            }
            Action::BarrierFailed { id, reason } => {
                if let Some(done) = self.barriers.remove(&id) {
                    let _ = done.send(Err(reason));
                }
            }
            Action::Committed { lsn } => self.store.set_committed(lsn),
            Action::Fenced { epoch, reason } => {
                self.fenced.store(epoch.0, Ordering::Release);
                tracing::error!(
                    "fenced: a primary at epoch {epoch} exists ({reason}); this node refuses \
                     every write and flush from now on"
                );
            }
            Action::StateChanged {
                replica,
                state,
                why,
            } => {
                // Retries cycle through connecting and disconnected; say each reason once.
                let line = format!("{}: {why}", state.name());
                if self.last_logged.get(&replica) == Some(&line) {
                    return;
                }
                match state {
                    PeerState::Connecting | PeerState::Handshake => {
                        tracing::debug!(%replica, state = state.name(), "{why}")
                    }
                    PeerState::NeedsRebuild | PeerState::Refused => {
                        tracing::warn!(%replica, state = state.name(), "{why}")
                    }
                    _ => tracing::info!(%replica, state = state.name(), "{why}"),
                }
                if !matches!(state, PeerState::Connecting | PeerState::Handshake) {
                    self.last_logged.insert(replica, line);
                }
            }
        }
    }

    fn connect(&mut self, replica: ReplicaId, session: SessionId) {
        if let Some(old) = self.conns.remove(&replica) {
            if let Some(r) = old.reader {
                r.abort();
            }
        }
        let Some(addr) = self.addrs.get(&replica).cloned() else {
            let _ = self.in_tx.send(Input::Event(Event::Disconnected {
                replica,
                session,
                now: millis(self.start),
                reason: "no address configured".into(),
            }));
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel::<Frame>();
        let queued = Arc::new(AtomicU64::new(0));
        let in_tx = self.in_tx.clone();
        let start = self.start;
        let q = queued.clone();
        let r = replica.clone();
        let reader = tokio::spawn(async move {
            let gone = |reason: String| {
                Input::Event(Event::Disconnected {
                    replica: r.clone(),
                    session,
                    now: millis(start),
                    reason,
                })
            };
            let stream =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let _ = in_tx.send(gone(format!("cannot connect to {addr}: {e}")));
                        return;
                    }
                    Err(_) => {
                        let _ = in_tx.send(gone(format!("connecting to {addr} timed out")));
                        return;
                    }
                };
            let _ = stream.set_nodelay(true);
            let (rd, wr) = stream.into_split();
            tokio::spawn(super::write_frames(wr, rx, move |sent| {
                q.fetch_sub(sent, Ordering::Relaxed);
            }));
            let _ = in_tx.send(Input::Event(Event::Connected {
                replica: r.clone(),
                session,
                now: millis(start),
            }));
            let mut frames = FramedRead::with_capacity(rd, FrameCodec, 64 << 10);
            let reason = loop {
                match frames.next().await {
                    Some(Ok(frame)) => {
                        let ev = Event::Received {
                            replica: r.clone(),
                            session,
                            frame,
                            now: millis(start),
                        };
                        if in_tx.send(Input::Event(ev)).is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => break format!("bad frame from replica: {e}"),
                    None => break "replica closed the connection".to_string(),
                }
            };
            let _ = in_tx.send(gone(reason));
        });
        self.conns.insert(
            replica,
            Conn {
                session,
                tx,
                queued,
                reader: Some(reader),
            },
        );
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

/// Sends the data file, as it is on disk, to a rebuilding replica: data in chunks, holes as
/// ranges. It may be newer than the base (the flusher keeps running); the replica's
/// "WAL wins" rule makes that harmless.
async fn stream_base(
    store: Arc<Store>,
    tx: mpsc::UnboundedSender<Frame>,
    queued: Arc<AtomicU64>,
    events: mpsc::UnboundedSender<Input>,
    replica: ReplicaId,
    session: SessionId,
    rate: u64,
) {
    const CHUNK: u64 = 1 << 20;
    const MAX_HOLE: u64 = 1 << 30;
    const MAX_QUEUED: u64 = 16 << 20;
    let total = store.size();
    let epoch = store.superblock().epoch;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut last_report = tokio::time::Instant::now();
    let mut reported = 0u64;
    let mut at = 0u64;
    while at < total {
        let span = (total - at).min(MAX_HOLE);
        let Some((len, data)) = store.base_extent(at, span) else {
            break;
        };
        let len = if data { len.min(CHUNK) } else { len };
        let body = if data {
            match store.read_base(at, len).await {
                Ok(bytes) => crate::wire::Body::BaseChunk {
                    offset: at,
                    length: len,
                    data: Some(bytes),
                },
                Err(e) => {
                    tracing::error!(%replica, "cannot read the base image: {e}");
                    let _ = events.send(Input::Event(Event::Disconnected {
                        replica,
                        session,
                        now: 0,
                        reason: format!("base image unreadable: {e}"),
                    }));
                    return;
                }
            }
        } else {
            crate::wire::Body::BaseChunk {
                offset: at,
                length: len,
                data: None,
            }
        };
        let frame = Frame { epoch, body };
        let size = frame.queued_size();
        // Back-pressure: the replica applies base data no faster than it can.
        while queued.load(Ordering::Relaxed) > MAX_QUEUED {
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        queued.fetch_add(size, Ordering::Relaxed);
        if tx.send(frame).is_err() {
            return; // the session ended
        }
        at += len;
        if data {
            sent += len;
            if rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    tokio::time::sleep(due - elapsed).await;
                }
            }
        }
        // Progress every 64 MiB or every second, whichever comes first: a rate-limited
        // rebuild must not look stalled between reports.
        if at - reported >= 64 << 20 || at == total || last_report.elapsed() >= PROGRESS_EVERY {
            reported = at;
            last_report = tokio::time::Instant::now();
            let _ = events.send(Input::Event(Event::BaseProgress {
                replica: replica.clone(),
                session,
                done: at,
                total,
            }));
        }
    }
    tracing::info!(
        %replica,
        "base image sent ({} MiB of data) in {:.1} s",
        sent >> 20,
        started.elapsed().as_secs_f64()
    );
    let _ = events.send(Input::Event(Event::BaseSent { replica, session }));
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use blockrep_storage::{Epoch, Lsn, RecordKind, WalRecord};
    use bytes::{Bytes, BytesMut};

    use crate::wire::{self, Body, Frame};

    /// A socket that takes at most `max` bytes per call and may stop in the middle of a part.
    struct Trickle {
        got: Vec<u8>,
        max: usize,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.max {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn no_shipped_frame_outgrows_what_a_replica_accepts() {
        let sizes = [
            4096,
            32 << 20,
            4096,
            4096,
            32 << 20,
            32 << 20,
            512,
            1 << 20,
            4096,
        ];
        let records: Vec<WalRecord> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let payload = Bytes::from(vec![0u8; n]);
                WalRecord::new(
                    Lsn(i as u64 + 1),
                    Epoch(1),
                    RecordKind::Write,
                    0,
                    n as u64,
                    payload,
                )
            })
            .collect();
        let batches = super::frame_batches(records, super::SHIP_FRAME_BYTES);
        // Entries without payload (trims, zeroes) count their headers: a backlog of them
        // is cut too.
        let trims: Vec<WalRecord> = (1..=50_000u64)
            .map(|l| WalRecord::new(Lsn(l), Epoch(1), RecordKind::Trim, 0, 4096, Bytes::new()))
            .collect();
        let trim_batches = super::frame_batches(trims, super::SHIP_FRAME_BYTES);
        assert!(trim_batches.len() > 2);
        for b in &trim_batches {
            assert!((b.len() * wire::ENTRY_HEADER_LEN) as u64 <= super::SHIP_FRAME_BYTES);
        }
        let lsns: Vec<u64> = batches.iter().flatten().map(|r| r.lsn.0).collect();
        assert_eq!(
            lsns,
            (1..=sizes.len() as u64).collect::<Vec<_>>(),
            "every entry, in order"
        );
        for b in &batches {
            let payload: u64 = b.iter().map(|r| r.payload.len() as u64).sum();
            let framed = payload + (b.len() * wire::ENTRY_HEADER_LEN) as u64;
            assert!(
                b.len() == 1 || framed <= super::SHIP_FRAME_BYTES,
                "{framed} bytes"
            );
            let frame = Frame {
                epoch: Epoch(1),
                body: Body::Entries {
                    committed: Lsn(0),
                    records: b.clone(),
                },
            };
            let mut buf = BytesMut::new();
            wire::encode(&frame, &mut buf);
            assert!(buf.len() - wire::HEADER_LEN <= wire::MAX_BODY);
            assert!(wire::decode(buf.freeze()).is_ok());
        }
    }

    #[tokio::test]
    async fn shipped_frames_arrive_whole_and_in_order_across_short_writes() {
        let records: Vec<WalRecord> = (1..=5u64)
            .map(|i| {
                let payload = Bytes::from(vec![i as u8; 4096 + i as usize]);
                let len = payload.len() as u64;
                WalRecord::new(Lsn(i), Epoch(1), RecordKind::Write, i << 20, len, payload)
            })
            .collect();
        let frames = [
            Frame {
                epoch: Epoch(1),
                body: Body::Entries {
                    committed: Lsn(0),
                    records,
                },
            },
            Frame {
                epoch: Epoch(1),
                body: Body::Barrier {
                    lsn: Lsn(5),
                    committed: Lsn(0),
                },
            },
        ];
        let mut expected = BytesMut::new();
        let mut parts = Vec::new();
        for f in &frames {
            wire::encode(f, &mut expected);
            wire::encode_parts(f, &mut parts);
        }
        // Empty parts anywhere are skipped, never taken for a closed socket.
        parts.insert(0, Bytes::new());
        parts.insert(3, Bytes::new());
        parts.push(Bytes::new());
        for max in [1, 7, 48, 4096, 1 << 20] {
            let mut sock = Trickle {
                got: Vec::new(),
                max,
            };
            let mut todo = parts.clone();
            crate::driver::write_parts(&mut sock, &mut todo)
                .await
                .unwrap();
            assert!(todo.is_empty(), "parts left after writing them");
            assert_eq!(sock.got, &expected[..], "{max} bytes per write");
        }
    }
}
