//! A replica node: accepts primary sessions on a TCP port and applies what they ship.

use std::collections::HashMap;
use std::sync::Arc;

use blockrep_storage::{Lsn, Role, StorageError, Store};
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::FrameCodec;
use crate::core::replica::{Action, ConnId, Event, ReplicaCore, ReplicaState};
use crate::wire::{Body, Frame, RejectReason};

/// What a replica node reports about itself.
#[derive(Debug, Clone, Default)]
pub struct ReplicaStatus {
    pub epoch: blockrep_storage::Epoch,
    pub head: blockrep_storage::Lsn,
    pub durable: blockrep_storage::Lsn,
    pub committed: blockrep_storage::Lsn,
    pub connected: bool,
}

fn initial_state(store: &Store) -> ReplicaState {
    let sb = store.superblock();
    ReplicaState {
        volume_id: sb.volume_id,
        volume_size: sb.volume_size,
        store_id: sb.store_id,
        blank: store.is_blank(),
        epoch: sb.epoch,
        epoch_owner: sb.epoch_owner,
        head: store.head(),
        head_epoch: store.head_epoch(),
        durable: store.durable(),
        committed: store.committed(),
        was_primary: sb.role == Role::Primary && sb.epoch.0 > 0,
        rebuilding: store.is_rebuilding(),
    }
}

/// Frames read from a primary but not yet applied hold at most this much memory. Past it
/// the connection stops reading, so TCP pushes back and the primary's own bounded send queue
/// takes the excess: a replica slower than its primary slows the shipping down (or, at the
/// primary's limit, loses its session and catches up) instead of growing without bound.
const MAX_INTAKE_BYTES: u64 = 64 << 20;

enum Input {
    Event(Event),
    /// A frame from a primary; `_intake` returns its share of the intake once applied.
    Received {
        conn: ConnId,
        frame: Frame,
        _intake: tokio::sync::OwnedSemaphorePermit,
    },
    Accepted {
        conn: ConnId,
        tx: mpsc::UnboundedSender<Frame>,
        peer: String,
    },
}

/// Serves replication on `listener` until `shutdown`.
pub async fn run(
    store: Arc<Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
    status: Option<watch::Sender<ReplicaStatus>>,
) -> Result<(), StorageError> {
    // The data file takes only committed entries while it can, so the tail a failover
    // discards can be cut in place (see `Store::set_checkpoint_gate`).
    store.set_checkpoint_gate(Some(store.committed()));
    let (in_tx, mut inputs) = mpsc::unbounded_channel::<Input>();
    let mut node = ReplicaLoop {
        core: ReplicaCore::new(initial_state(&store)),
        durable: store.watch_durable(),
        store,
        conns: HashMap::new(),
        in_tx,
        syncs: Vec::new(),
        status,
        rejected: Default::default(),
    };
    let mut next_conn = 1u64;
    loop {
        let input = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // The store made more durable: answer the syncs it covers, before anything else.
            Ok(()) = node.durable.changed() => {
                node.durable.borrow_and_update();
                node.answer_syncs().await;
                continue;
            }
            Some(input) = inputs.recv() => input,
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, addr)) => {
                        let _ = stream.set_nodelay(true);
                        let conn = ConnId(next_conn);
                        next_conn += 1;
                        spawn_connection(stream, conn, addr.to_string(), node.in_tx.clone());
                    }
                    Err(e) => tracing::warn!("accept failed: {e}"),
                }
                continue;
            }
        };
        let (event, _intake) = match input {
            Input::Accepted { conn, tx, peer } => {
                tracing::debug!(conn = conn.0, %peer, "replication connection");
                node.conns.insert(conn, (tx, peer));
                continue;
            }
            Input::Event(e) => (e, None),
            Input::Received {
                conn,
                frame,
                _intake,
            } => (Event::Received { conn, frame }, Some(_intake)),
        };
        node.step(event).await;
        // A sync the store already covers is answered now, not at its next change.
        node.answer_syncs().await;
    }
    Ok(())
}

/// The replica's event loop state: the core, the store, and the sessions' transports.
struct ReplicaLoop {
    store: Arc<Store>,
    core: ReplicaCore,
    /// Each session's frame queue and its peer's address.
    conns: HashMap<ConnId, (mpsc::UnboundedSender<Frame>, String)>,
    in_tx: mpsc::UnboundedSender<Input>,
    /// The store's durable LSN as it moves: the one source of what a sync may report.
    durable: watch::Receiver<Lsn>,
    /// Syncs asked for and not yet covered by the durable LSN, in the order asked. One
    /// whose session has closed is still answered: the core learns the durable LSN from it.
    syncs: Vec<(ConnId, Lsn)>,
    status: Option<watch::Sender<ReplicaStatus>>,
    /// Sessions just sent a `Reject`: their close is already logged, as the refusal.
    rejected: std::collections::HashSet<ConnId>,
}

impl ReplicaLoop {
    /// Runs one event through the core, carries out its actions, and publishes the status.
    async fn step(&mut self, event: Event) {
        if let Event::Closed { conn } = &event {
            self.conns.remove(conn);
            self.rejected.remove(conn);
        }
        for action in self.core.step(event) {
            self.execute(action).await;
        }
        if let Some(tx) = &self.status {
            let s = self.core.state();
            let _ = tx.send(ReplicaStatus {
                epoch: s.epoch,
                head: s.head,
                durable: s.durable,
                committed: s.committed,
                connected: self.core.active().is_some(),
            });
        }
    }

    /// Tells the core of every sync the store's durable LSN now covers.
    async fn answer_syncs(&mut self) {
        let durable = *self.durable.borrow();
        if !self.syncs.iter().any(|(_, lsn)| *lsn <= durable) {
            return;
        }
        let (done, waiting) = std::mem::take(&mut self.syncs)
            .into_iter()
            .partition(|(_, lsn)| *lsn <= durable);
        self.syncs = waiting;
        for (conn, _) in done {
            self.step(Event::Synced { conn, durable }).await;
        }
    }

    /// Asks the store to make `lsn` durable; the answer comes from the durable LSN's watch
    /// ([`ReplicaLoop::answer_syncs`]). Only a failure comes back here, as the session's end.
    fn sync(&mut self, conn: ConnId, lsn: Lsn) {
        self.syncs.push((conn, lsn));
        if *self.durable.borrow() >= lsn {
            return;
        }
        let store = self.store.clone();
        let in_tx = self.in_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = store.wait_durable(lsn).await {
                tracing::error!("replica store cannot sync: {e}");
                let _ = in_tx.send(Input::Event(Event::Closed { conn }));
            }
        });
    }

    async fn execute(&mut self, action: Action) {
        match action {
            Action::Send { conn, frame } => {
                if let Some((tx, _)) = self.conns.get(&conn) {
                    if matches!(frame.body, Body::Reject { .. }) {
                        self.rejected.insert(conn);
                    }
                    let _ = tx.send(frame);
                }
            }
            Action::Close { conn, reason } => {
                let rejected = self.rejected.remove(&conn);
                if let Some((_, peer)) = self.conns.remove(&conn) {
                    // The core logs each refusal (with its reason) as it makes it.
                    if rejected {
                        tracing::debug!(%peer, "closing replication session: {reason}");
                    } else {
                        tracing::info!(%peer, "closing replication session: {reason}");
                    }
                }
            }
            Action::AdoptVolume { volume_id } => self.adopt_volume(volume_id).await,
            Action::AdoptEpoch { epoch, owner } => self.adopt_epoch(epoch, owner).await,
            Action::Append { record } => {
                let lsn = record.lsn;
                if let Err(e) = self.store.append_replicated(record).await {
                    self.fail_storage(format!("cannot append entry {lsn}: {e}"));
                }
            }
            Action::Sync { conn, lsn } => self.sync(conn, lsn),
            Action::SetCommitted { lsn } => {
                self.store.set_committed(lsn);
                self.store.set_checkpoint_gate(Some(lsn));
            }
            Action::BeginRebuild { base, history } => self.begin_rebuild(base, history).await,
            Action::ApplyBase {
                offset,
                length,
                data,
            } => {
                if let Err(e) = self.store.apply_base(offset, length, data).await {
                    self.fail_storage(format!("cannot apply base data: {e}"));
                }
            }
            Action::Truncate { conn, keep } => self.truncate(conn, keep).await,
            Action::FinishRebuild { conn, target } => self.finish_rebuild(conn, target),
        }
    }

    async fn adopt_volume(&mut self, volume_id: blockrep_storage::VolumeId) {
        let s = self.store.clone();
        match tokio::task::spawn_blocking(move || s.adopt_volume(volume_id)).await {
            Ok(Ok(())) => tracing::info!("blank store joined volume {volume_id}"),
            other => self.fail_storage(format!("cannot join volume: {other:?}")),
        }
    }

    async fn adopt_epoch(
        &mut self,
        epoch: blockrep_storage::Epoch,
        owner: blockrep_storage::VolumeId,
    ) {
        let s = self.store.clone();
        match tokio::task::spawn_blocking(move || s.adopt_epoch(epoch, owner)).await {
            Ok(Ok(())) => tracing::info!("following primary store {owner} at epoch {epoch}"),
            other => self.fail_storage(format!("cannot adopt epoch {epoch}: {other:?}")),
        }
    }

    async fn begin_rebuild(&mut self, base: Lsn, history: Vec<(blockrep_storage::Epoch, Lsn)>) {
        let s = self.store.clone();
        match tokio::task::spawn_blocking(move || s.begin_rebuild(base, history)).await {
            Ok(Ok(())) => tracing::info!("rebuilding from the primary's base at LSN {base}"),
            other => self.fail_storage(format!("cannot start a rebuild: {other:?}")),
        }
    }

    async fn truncate(&mut self, conn: ConnId, keep: Lsn) {
        let s = self.store.clone();
        let refusal = match tokio::task::spawn_blocking(move || s.truncate_after(keep)).await {
            Ok(Ok(())) => None,
            Ok(Err(e @ StorageError::CannotTruncate { .. })) => Some(e.to_string()),
            Ok(Err(e)) => {
                self.fail_storage(format!("cannot cut the log: {e}"));
                return;
            }
            Err(e) => Some(format!("the cut did not run: {e}")),
        };
        match &refusal {
            None => tracing::info!("cut the log after entry {keep}, as the primary asked"),
            Some(why) => tracing::warn!("refused to cut the log after entry {keep}: {why}"),
        }
        let event = Event::Truncated {
            conn,
            head: self.store.head(),
            head_epoch: self.store.head_epoch(),
            refusal,
        };
        let _ = self.in_tx.send(Input::Event(event));
    }

    fn finish_rebuild(&self, conn: ConnId, target: Lsn) {
        let store = self.store.clone();
        let in_tx = self.in_tx.clone();
        tokio::spawn(async move {
            let finished = match store.wait_durable(target).await {
                Ok(()) => {
                    let s = store.clone();
                    tokio::task::spawn_blocking(move || s.finish_rebuild())
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()))
                }
                Err(e) => Err(e.to_string()),
            };
            let event = match finished {
                Ok(()) => {
                    tracing::info!("rebuild finished, durable through {}", store.durable());
                    Event::RebuildFinished {
                        conn,
                        durable: store.durable(),
                    }
                }
                Err(e) => {
                    tracing::error!("cannot finish the rebuild: {e}");
                    Event::Closed { conn }
                }
            };
            let _ = in_tx.send(Input::Event(event));
        });
    }

    /// A storage failure ends every session; the primary will see the replica as gone.
    fn fail_storage(&mut self, msg: String) {
        tracing::error!("{msg}");
        let epoch = self.core.state().epoch;
        for (conn, (tx, _)) in self.conns.drain() {
            let _ = tx.send(Frame {
                epoch,
                body: Body::Reject {
                    reason: RejectReason::StorageFailed,
                    message: msg.clone(),
                },
            });
            let _ = self.in_tx.send(Input::Event(Event::Closed { conn }));
        }
    }
}

fn spawn_connection(
    stream: tokio::net::TcpStream,
    conn: ConnId,
    peer: String,
    in_tx: mpsc::UnboundedSender<Input>,
) {
    let (r, w) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Frame>();
    let _ = in_tx.send(Input::Accepted {
        conn,
        tx,
        peer: peer.clone(),
    });
    tokio::spawn(super::write_frames(w, rx, |_| ()));
    tokio::spawn(async move {
        let intake = Arc::new(tokio::sync::Semaphore::new(MAX_INTAKE_BYTES as usize));
        if let Err(e) = read_frames(r, conn, intake, &in_tx).await {
            tracing::warn!(%peer, "closing replication connection: {e}");
        }
        let _ = in_tx.send(Input::Event(Event::Closed { conn }));
    });
}

/// Reads frames from one connection into the main loop, no further ahead of it than
/// `intake` allows (see [`MAX_INTAKE_BYTES`]). Returns when the connection or the loop ends.
async fn read_frames(
    r: impl tokio::io::AsyncRead + Unpin,
    conn: ConnId,
    intake: Arc<tokio::sync::Semaphore>,
    in_tx: &mpsc::UnboundedSender<Input>,
) -> Result<(), super::CodecError> {
    let mut frames = FramedRead::with_capacity(r, FrameCodec, 256 << 10);
    while let Some(frame) = frames.next().await {
        let frame = frame?;
        // A frame larger than the whole intake still gets in, alone.
        let share = frame.queued_size().min(MAX_INTAKE_BYTES) as u32;
        let Ok(permit) = intake.clone().acquire_many_owned(share).await else {
            return Ok(());
        };
        let input = Input::Received {
            conn,
            frame,
            _intake: permit,
        };
        if in_tx.send(input).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use blockrep_storage::{Epoch, Lsn, RecordKind, WalRecord};
    use bytes::{Bytes, BytesMut};
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    use super::{read_frames, Input};
    use crate::core::replica::ConnId;
    use crate::wire::{self, Body, Frame};

    fn entries(lsn: u64) -> Frame {
        let payload = Bytes::from(vec![lsn as u8; 4096]);
        Frame {
            epoch: Epoch(1),
            body: Body::Entries {
                committed: Lsn(0),
                records: vec![WalRecord::new(
                    Lsn(lsn),
                    Epoch(1),
                    RecordKind::Write,
                    0,
                    4096,
                    payload,
                )],
            },
        }
    }

    /// The LSN of the one entry a frame from `entries` carries.
    fn lsn_of(input: Input) -> Option<u64> {
        match input {
            Input::Received { frame, .. } => match frame.body {
                Body::Entries { records, .. } => Some(records[0].lsn.0),
                _ => None,
            },
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_replica_reads_no_further_ahead_than_its_intake_holds() {
        let share = entries(1).queued_size() as usize;
        let intake = Arc::new(tokio::sync::Semaphore::new(3 * share));
        let (mut primary, replica) = tokio::io::duplex(8 << 10);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            read_frames(replica, ConnId(1), intake, &tx).await.unwrap();
        });
        let sender = tokio::spawn(async move {
            for lsn in 1..=10 {
                let mut buf = BytesMut::new();
                wire::encode(&entries(lsn), &mut buf);
                primary.write_all(&buf).await.unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut held = Vec::new();
        while let Ok(input) = rx.try_recv() {
            held.push(input);
        }
        assert_eq!(held.len(), 3, "frames read while none was applied");
        assert!(
            !sender.is_finished(),
            "the primary's writes must be held back"
        );
        // Applying (dropping) the frames lets the rest in, in order.
        let mut lsns = Vec::new();
        lsns.extend(held.drain(..).filter_map(lsn_of));
        while lsns.len() < 10 {
            let input = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("frames stopped coming")
                .expect("reader ended");
            lsns.extend(lsn_of(input));
        }
        assert_eq!(lsns, (1..=10).collect::<Vec<_>>());
        sender.await.unwrap();
        drop(rx);
        reader.abort();
    }
}
