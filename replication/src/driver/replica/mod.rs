//! A replica node: accepts primary sessions on a TCP port and applies what they ship.
//!
//! The loop is here; one connection's reader and writer, with their bounds, are in `conn`;
//! the port's connection cap and accept backoff in `port`; the peers' TLS, when the node
//! has it, in `crate::driver::tls`.

mod conn;
mod port;

use std::collections::HashMap;
use std::sync::Arc;

use blockrep_storage::{Lsn, Role, StorageError, Store};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::conn::{Input, Outbound};
pub use self::conn::{HANDSHAKE_TIMEOUT, MAX_OUTBOUND_BYTES};
pub use self::port::MAX_CONNECTIONS;
use crate::core::replica::{Action, ConnId, Event, ReplicaCore, ReplicaState};
use crate::driver::tls::PeerTls;
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
        cursor: store.rebuild_cursor(),
    }
}

/// Serves replication on `listener` until `shutdown`, in plaintext.
pub async fn run(
    store: Arc<Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
    status: Option<watch::Sender<ReplicaStatus>>,
) -> Result<(), StorageError> {
    serve(store, listener, shutdown, status, None).await
}

/// Serves replication on `listener` until `shutdown`; with `tls`, only to peers that complete
/// a mutual TLS handshake with a certificate from its CA (the rest are refused before a
/// single frame is read from them).
pub async fn serve(
    store: Arc<Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
    status: Option<watch::Sender<ReplicaStatus>>,
    tls: Option<PeerTls>,
) -> Result<(), StorageError> {
    // The data file takes only committed entries while it can, so the tail a failover
    // discards can be cut in place (see `Store::set_checkpoint_gate`).
    store.set_checkpoint_gate(Some(store.committed()));
    // And the WAL after the committed LSN is kept even past the gate, for the old primary
    // to catch up from should this store be promoted (see `Store::keep_wal_after`).
    store.keep_wal_after(store.committed());
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
        refused: None,
        out_of_space: false,
    };
    let mut port = port::Port::new(listener, MAX_CONNECTIONS);
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
            a = port.accept() => {
                let _ = a.stream.set_nodelay(true);
                let conn = ConnId(next_conn);
                next_conn += 1;
                conn::admit(a, conn, tls.clone(), node.in_tx.clone());
                continue;
            }
        };
        let (event, _intake) = match input {
            Input::Accepted { conn, out } => {
                tracing::debug!(conn = conn.0, peer = %out.peer, "replication connection");
                node.conns.insert(conn, out);
                continue;
            }
            // The store's cursor as it is now: a rebuild begun since the save dropped it.
            Input::Event(Event::CursorSaved { .. }) => {
                let cursor = node.store.rebuild_cursor();
                (Event::CursorSaved { cursor }, None)
            }
            Input::Event(e) => (e, None),
            // A session this loop already ended (refused, or dropped for not reading): what
            // it still had in flight is moot, and refusing each frame would log each.
            Input::Received { conn, .. } if !node.conns.contains_key(&conn) => continue,
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

/// What the store was handed to take in, as the log names it.
#[derive(Debug, Clone, Copy)]
enum Taken {
    Entry(Lsn),
    /// Base data from this byte of the volume.
    Base(u64),
}

impl std::fmt::Display for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Taken::Entry(lsn) => write!(f, "entry {lsn}"),
            Taken::Base(offset) => write!(f, "base data at byte {offset}"),
        }
    }
}

/// The replica's event loop state: the core, the store, and the sessions' transports.
struct ReplicaLoop {
    store: Arc<Store>,
    core: ReplicaCore,
    /// Each session's bounded frame queue (with its peer's address).
    conns: HashMap<ConnId, Outbound>,
    in_tx: mpsc::UnboundedSender<Input>,
    /// The store's durable LSN as it moves: the one source of what a sync may report.
    durable: watch::Receiver<Lsn>,
    /// Syncs asked for and not yet covered by the durable LSN, in the order asked. One
    /// whose session has closed is still answered: the core learns the durable LSN from it.
    syncs: Vec<(ConnId, Lsn)>,
    status: Option<watch::Sender<ReplicaStatus>>,
    /// Sessions just sent a `Reject`: their close is already logged, as the refusal.
    rejected: std::collections::HashSet<ConnId>,
    /// What the store refused in the batch being carried out (an entry or base data, and
    /// why): the rest of the batch's appends and base data are skipped and the core told
    /// once the batch ends.
    refused: Option<(Taken, StorageError)>,
    /// The store last refused something for lack of space: said once, and again only once
    /// it has taken something since.
    out_of_space: bool,
}

impl ReplicaLoop {
    /// Runs one event through the core, carries out its actions, and publishes the status.
    async fn step(&mut self, event: Event) {
        if let Event::Closed { conn } = &event {
            self.conns.remove(conn);
            self.rejected.remove(conn);
        }
        let mut next = Some(event);
        while let Some(event) = next.take() {
            for action in self.core.step(event) {
                self.execute(action).await;
            }
            next = self
                .refused
                .take()
                .map(|(what, e)| self.store_refused(what, e));
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
            Action::Send { conn, frame } => self.send(conn, frame),
            Action::Close { conn, reason } => {
                let rejected = self.rejected.remove(&conn);
                if let Some(Outbound { peer, .. }) = self.conns.remove(&conn) {
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
            // After a refused entry the store would see a gap (and after refused base data,
            // the primary resends from the rebuild's cursor): the rest waits to be sent again.
            Action::Append { .. } | Action::ApplyBase { .. } if self.refused.is_some() => {}
            Action::Append { record } => {
                let what = Taken::Entry(record.lsn);
                let stored = self.store.append_replicated(record).await.map(|_| ());
                self.stored(what, stored);
            }
            Action::Sync { conn, lsn } => self.sync(conn, lsn),
            Action::SetCommitted { lsn } => {
                self.store.set_committed(lsn);
                self.store.set_checkpoint_gate(Some(lsn));
                self.store.keep_wal_after(lsn);
            }
            Action::BeginRebuild {
                base,
                history,
                resume,
            } => self.begin_rebuild(base, history, resume).await,
            Action::ApplyBase {
                offset,
                length,
                reflects,
                data,
            } => {
                let what = Taken::Base(offset);
                let stored = self.store.apply_base(offset, length, data, reflects).await;
                if self.stored(what, stored) && self.store.rebuild_cursor_due() {
                    self.save_cursor();
                }
            }
            Action::Truncate { conn, keep } => self.truncate(conn, keep).await,
            Action::FinishRebuild { conn, target } => self.finish_rebuild(conn, target),
        }
    }

    /// Queues `frame` for `conn`. A peer whose queue is full has stopped reading: it is
    /// dropped at once (logged here, once, as the connection leaves the table), freeing what
    /// was queued for it; the core hears of it as the connection's close.
    fn send(&mut self, conn: ConnId, frame: Frame) {
        let Some(out) = self.conns.get(&conn) else {
            return;
        };
        let reject = matches!(frame.body, Body::Reject { .. });
        if out.send(frame).is_err() {
            if let Some(out) = self.conns.remove(&conn) {
                tracing::warn!(
                    peer = %out.peer,
                    "disconnecting a replication peer that does not read: more than \
                     {MAX_OUTBOUND_BYTES} bytes queued for it"
                );
                out.abort();
            }
            return;
        }
        if reject {
            self.rejected.insert(conn);
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

    async fn begin_rebuild(
        &mut self,
        base: Lsn,
        history: Vec<(blockrep_storage::Epoch, Lsn)>,
        resume: Option<u64>,
    ) {
        let s = self.store.clone();
        match tokio::task::spawn_blocking(move || s.begin_rebuild(base, history, resume)).await {
            Ok(Ok(())) => match resume {
                Some(at) => tracing::info!(
                    "resuming the rebuild from the primary's base at LSN {base}, from byte {at}"
                ),
                None => tracing::info!("rebuilding from the primary's base at LSN {base}"),
            },
            other => self.fail_storage(format!("cannot start a rebuild: {other:?}")),
        }
    }

    /// Writes the rebuild cursor off the event loop (it runs a durable checkpoint); the core
    /// learns the new cursor for its next hello.
    fn save_cursor(&self) {
        let store = self.store.clone();
        let in_tx = self.in_tx.clone();
        tokio::task::spawn_blocking(move || match store.save_rebuild_cursor() {
            Ok(Some(cursor)) => {
                tracing::debug!(through = cursor.through, "rebuild cursor written");
                let _ = in_tx.send(Input::Event(Event::CursorSaved { cursor: None }));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot write the rebuild cursor: {e}"),
        });
    }

    async fn truncate(&mut self, conn: ConnId, keep: Lsn) {
        let s = self.store.clone();
        let refusal = match tokio::task::spawn_blocking(move || s.truncate_after(keep)).await {
            Ok(Ok(())) => None,
            Ok(Err(e @ StorageError::CannotTruncate { .. })) => Some(e.to_string()),
            Ok(Err(e)) => {
                let why = format!("cannot cut the log: {e}");
                self.fail_storage(why.clone());
                // The core still hears the cut's end, or it would hold every later frame.
                Some(why)
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

    /// Notes whether the store took `what` (an entry or base data); returns whether it did.
    fn stored(&mut self, what: Taken, result: Result<(), StorageError>) -> bool {
        match result {
            Ok(()) => {
                if self.out_of_space {
                    self.out_of_space = false;
                    tracing::info!("the store has space again: took {what}");
                }
                true
            }
            Err(e) => {
                self.refused = Some((what, e));
                false
            }
        }
    }

    /// The store refused `what`: says why (a full filesystem once, until the store takes
    /// something again) and gives the core the event that puts it back on the store's head
    /// and refuses the session with the reason. Any other failure also ends every other
    /// session, as a storage failure does.
    fn store_refused(&mut self, what: Taken, e: StorageError) -> Event {
        let no_space = matches!(e, StorageError::NoSpace { .. });
        let message = if no_space {
            format!("the replica's filesystem is full: {what} was not stored ({e})")
        } else {
            format!("cannot store {what}: {e}")
        };
        if !no_space {
            self.fail_storage(message.clone());
        } else if !self.out_of_space {
            self.out_of_space = true;
            tracing::error!(
                "{message}; refusing what needs space until space is freed, then the primary \
                 catches this replica up"
            );
        }
        Event::StoreRefused {
            head: self.store.head(),
            head_epoch: self.store.head_epoch(),
            no_space,
            message,
        }
    }

    /// A storage failure ends every session; the primary will see the replica as gone.
    fn fail_storage(&mut self, msg: String) {
        tracing::error!("{msg}");
        let epoch = self.core.state().epoch;
        for (conn, out) in self.conns.drain() {
            let _ = out.send(Frame {
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
