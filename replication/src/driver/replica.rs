//! A replica node: accepts primary sessions on a TCP port and applies what they ship.

use std::collections::HashMap;
use std::sync::Arc;

use blockrep_storage::{Role, StorageError, Store};
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
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
    status: Option<tokio::sync::watch::Sender<ReplicaStatus>>,
) -> Result<(), StorageError> {
    // The data file takes only committed entries while it can, so the tail a failover
    // discards can be cut in place (see `Store::set_checkpoint_gate`).
    store.set_checkpoint_gate(Some(store.committed()));
    let state = initial_state(&store);
    let mut core = ReplicaCore::new(state);
    let (in_tx, mut inputs) = mpsc::unbounded_channel::<Input>();
    let mut conns: HashMap<ConnId, (mpsc::UnboundedSender<Frame>, String)> = HashMap::new();
    let mut next_conn = 1u64;
    loop {
        let input = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(input) = inputs.recv() => input,
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, addr)) => {
                        let _ = stream.set_nodelay(true);
                        let conn = ConnId(next_conn);
                        next_conn += 1;
                        spawn_connection(stream, conn, addr.to_string(), in_tx.clone());
                    }
                    Err(e) => tracing::warn!("accept failed: {e}"),
                }
                continue;
            }
        };
        let (event, _intake) = match input {
            Input::Accepted { conn, tx, peer } => {
                tracing::debug!(conn = conn.0, %peer, "replication connection");
                conns.insert(conn, (tx, peer));
                continue;
            }
            Input::Event(e) => (e, None),
            Input::Received {
                conn,
                frame,
                _intake,
            } => (Event::Received { conn, frame }, Some(_intake)),
        };
        if let Event::Closed { conn } = &event {
            conns.remove(conn);
        }
        for action in core.step(event) {
            execute(&store, &mut core, &mut conns, &in_tx, action).await;
        }
        if let Some(tx) = &status {
            let s = core.state();
            let _ = tx.send(ReplicaStatus {
                epoch: s.epoch,
                head: s.head,
                durable: s.durable,
                committed: s.committed,
                connected: core.active().is_some(),
            });
        }
    }
    Ok(())
}

async fn execute(
    store: &Arc<Store>,
    core: &mut ReplicaCore,
    conns: &mut HashMap<ConnId, (mpsc::UnboundedSender<Frame>, String)>,
    in_tx: &mpsc::UnboundedSender<Input>,
    action: Action,
) {
    match action {
        Action::Send { conn, frame } => {
            if let Some((tx, _)) = conns.get(&conn) {
                let _ = tx.send(frame);
            }
        }
        Action::Close { conn, reason } => {
            if let Some((_, peer)) = conns.remove(&conn) {
                tracing::info!(%peer, "closing replication session: {reason}");
            }
        }
        Action::AdoptVolume { volume_id } => {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.adopt_volume(volume_id)).await {
                Ok(Ok(())) => tracing::info!("blank store joined volume {volume_id}"),
                other => fail_storage(core, conns, in_tx, format!("cannot join volume: {other:?}")),
            }
        }
        Action::AdoptEpoch { epoch, owner } => {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.adopt_epoch(epoch, owner)).await {
                Ok(Ok(())) => tracing::info!("following primary store {owner} at epoch {epoch}"),
                other => fail_storage(
                    core,
                    conns,
                    in_tx,
                    format!("cannot adopt epoch {epoch}: {other:?}"),
                ),
            }
        }
        Action::Append { record } => {
            let lsn = record.lsn;
            if let Err(e) = store.append_replicated(record).await {
                fail_storage(
                    core,
                    conns,
                    in_tx,
                    format!("cannot append entry {lsn}: {e}"),
                );
            }
        }
        Action::Sync { conn, lsn } => {
            let store = store.clone();
            let in_tx = in_tx.clone();
            tokio::spawn(async move {
                match store.wait_durable(lsn).await {
                    Ok(()) => {
                        let durable = store.durable();
                        let _ = in_tx.send(Input::Event(Event::Synced { conn, durable }));
                    }
                    Err(e) => {
                        tracing::error!("replica store cannot sync: {e}");
                        let _ = in_tx.send(Input::Event(Event::Closed { conn }));
                    }
                }
            });
        }
        Action::SetCommitted { lsn } => {
            store.set_committed(lsn);
            store.set_checkpoint_gate(Some(lsn));
        }
        Action::BeginRebuild { base, history } => {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.begin_rebuild(base, history)).await {
                Ok(Ok(())) => tracing::info!("rebuilding from the primary's base at LSN {base}"),
                other => fail_storage(
                    core,
                    conns,
                    in_tx,
                    format!("cannot start a rebuild: {other:?}"),
                ),
            }
        }
        Action::ApplyBase {
            offset,
            length,
            data,
        } => {
            if let Err(e) = store.apply_base(offset, length, data).await {
                fail_storage(core, conns, in_tx, format!("cannot apply base data: {e}"));
            }
        }
        Action::Truncate { conn, keep } => {
            let s = store.clone();
            let refusal = match tokio::task::spawn_blocking(move || s.truncate_after(keep)).await {
                Ok(Ok(())) => None,
                Ok(Err(e @ StorageError::CannotTruncate { .. })) => Some(e.to_string()),
                Ok(Err(e)) => {
                    fail_storage(core, conns, in_tx, format!("cannot cut the log: {e}"));
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
                head: store.head(),
                head_epoch: store.head_epoch(),
                refusal,
            };
            let _ = in_tx.send(Input::Event(event));
        }
        Action::FinishRebuild { conn, target } => {
            let store = store.clone();
            let in_tx = in_tx.clone();
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
    }
}

/// A storage failure ends every session; the primary will see the replica as gone.
fn fail_storage(
    core: &mut ReplicaCore,
    conns: &mut HashMap<ConnId, (mpsc::UnboundedSender<Frame>, String)>,
    in_tx: &mpsc::UnboundedSender<Input>,
    msg: String,
) {
    tracing::error!("{msg}");
    let epoch = core.state().epoch;
    for (conn, (tx, _)) in conns.drain() {
        let _ = tx.send(Frame {
            epoch,
            body: Body::Reject {
                reason: RejectReason::StorageFailed,
                message: msg.clone(),
            },
        });
        let _ = in_tx.send(Input::Event(Event::Closed { conn }));
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
