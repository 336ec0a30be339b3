//! A replica node: accepts primary sessions on a TCP port and applies what they ship.

use std::collections::HashMap;
use std::sync::Arc;

use blockrep_storage::{Role, StorageError, Store};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
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

enum Input {
    Event(Event),
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
        let event = match input {
            Input::Accepted { conn, tx, peer } => {
                tracing::debug!(conn = conn.0, %peer, "replication connection");
                conns.insert(conn, (tx, peer));
                continue;
            }
            Input::Event(e) => e,
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
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    let _ = in_tx.send(Input::Accepted {
        conn,
        tx,
        peer: peer.clone(),
    });
    tokio::spawn(async move {
        let mut sink = FramedWrite::new(w, FrameCodec);
        while let Some(frame) = rx.recv().await {
            if sink.feed(frame).await.is_err() {
                return;
            }
            while let Ok(frame) = rx.try_recv() {
                if sink.feed(frame).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut frames = FramedRead::with_capacity(r, FrameCodec, 256 << 10);
        loop {
            match frames.next().await {
                Some(Ok(frame)) => {
                    if in_tx
                        .send(Input::Event(Event::Received { conn, frame }))
                        .is_err()
                    {
                        return;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(%peer, "closing replication connection: {e}");
                    break;
                }
                None => break,
            }
        }
        let _ = in_tx.send(Input::Event(Event::Closed { conn }));
    });
}
