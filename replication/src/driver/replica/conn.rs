//! One replication connection on the replica's side: its admission (the TLS handshake, when
//! the node has peer TLS), its reader (bounded intake, handshake timeout) and its writer
//! (bounded outbound queue), and what they tell the event loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::port::Admitted;
use crate::core::replica::{ConnId, Event};
use crate::driver::tls::PeerTls;
use crate::driver::{CodecError, FrameCodec};
use crate::wire::Frame;

/// Frames read from a primary but not yet applied hold at most this much memory. Past it
/// the connection stops reading, so TCP pushes back and the primary's own bounded send queue
/// takes the excess: a replica slower than its primary slows the shipping down (or, at the
/// primary's limit, loses its session and catches up) instead of growing without bound.
pub(super) const MAX_INTAKE_BYTES: u64 = 64 << 20;

/// Frames queued for a peer and not yet taken by its socket hold at most this much memory.
/// A replica only answers (acks, probe replies, refusals), so an honest primary keeps its
/// queue near empty; a peer that stops reading fills it and is disconnected.
pub const MAX_OUTBOUND_BYTES: u64 = 4 << 20;

/// A connection whose first frame has not arrived this long after it was accepted is
/// closed: an honest primary or prober sends its `Hello` or `Probe` at once. With peer TLS
/// the handshake counts within it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection's writer may go on delivering after its reader has ended.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// What the replica's event loop is told.
pub(super) enum Input {
    Event(Event),
    /// A frame from a primary; `_intake` returns its share of the intake once applied.
    Received {
        conn: ConnId,
        frame: Frame,
        _intake: OwnedSemaphorePermit,
    },
    Accepted {
        conn: ConnId,
        out: Outbound,
    },
}

/// A full outbound queue: the frame was not queued.
#[derive(Debug)]
pub(super) struct QueueFull;

/// One connection's frames on their way to its peer, bounded by [`MAX_OUTBOUND_BYTES`].
pub(super) struct Outbound {
    tx: mpsc::UnboundedSender<Frame>,
    /// Bytes queued and not yet written; the writer takes off what it writes.
    queued: Arc<AtomicU64>,
    /// Ends both halves of the connection at once, dropping whatever is queued.
    end: CancellationToken,
    pub peer: String,
}

impl Outbound {
    /// Queues `frame`, unless that would take the queue past its bound.
    pub fn send(&self, frame: Frame) -> Result<(), QueueFull> {
        let size = frame.queued_size();
        if self.queued.load(Ordering::Relaxed) + size > MAX_OUTBOUND_BYTES {
            return Err(QueueFull);
        }
        self.queued.fetch_add(size, Ordering::Relaxed);
        let _ = self.tx.send(frame);
        Ok(())
    }

    /// Drops the connection now: both halves close and the queued frames are freed. The
    /// reader then reports the connection closed to the loop.
    pub fn abort(&self) {
        self.end.cancel();
    }
}

/// Serves an admitted connection: at once in plaintext, or (without blocking the caller)
/// after a TLS handshake that must finish, with the first frame after it, within
/// [`HANDSHAKE_TIMEOUT`] of the accept. A peer the handshake refuses is dropped before
/// anything it sent is read as a frame, and the event loop never hears of it.
pub(super) fn admit(
    a: Admitted,
    conn: ConnId,
    tls: Option<PeerTls>,
    in_tx: mpsc::UnboundedSender<Input>,
) {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let peer = a.addr.to_string();
    let Some(tls) = tls else {
        let (r, w) = a.stream.into_split();
        return spawn(r, w, conn, peer, a.slot, deadline, in_tx);
    };
    tokio::spawn(async move {
        if let Some(stream) = tls.accept(a.stream, a.addr, deadline).await {
            let (r, w) = tokio::io::split(stream);
            spawn(r, w, conn, peer, a.slot, deadline, in_tx);
        }
    });
}

/// Starts the reader and the writer of an accepted connection; `slot` (its place under the
/// port's cap) is given back once both have ended. Its first frame must come by `deadline`.
fn spawn(
    r: impl AsyncRead + Unpin + Send + 'static,
    w: impl AsyncWrite + Unpin + Send + 'static,
    conn: ConnId,
    peer: String,
    slot: OwnedSemaphorePermit,
    deadline: Instant,
    in_tx: mpsc::UnboundedSender<Input>,
) {
    let (tx, rx) = mpsc::unbounded_channel::<Frame>();
    let queued = Arc::new(AtomicU64::new(0));
    let end = CancellationToken::new();
    let out = Outbound {
        tx,
        queued: queued.clone(),
        end: end.clone(),
        peer: peer.clone(),
    };
    let _ = in_tx.send(Input::Accepted { conn, out });
    let slot = Arc::new(slot);
    let writer_slot = slot.clone();
    let writer_end = end.clone();
    tokio::spawn(async move {
        let written = move |sent| {
            queued.fetch_sub(sent, Ordering::Relaxed);
        };
        tokio::select! {
            _ = crate::driver::write_frames(w, rx, written) => {}
            _ = writer_end.cancelled() => {}
        }
        writer_end.cancel();
        drop(writer_slot);
    });
    tokio::spawn(async move {
        let intake = Arc::new(Semaphore::new(MAX_INTAKE_BYTES as usize));
        let result = tokio::select! {
            r = read_frames(r, conn, intake, deadline - Instant::now(), &in_tx) => r,
            _ = end.cancelled() => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(%peer, "closing replication connection: {e}");
        }
        let _ = in_tx.send(Input::Event(Event::Closed { conn }));
        // The writer may still deliver a last answer (a refusal, say), but no longer than
        // this: a peer that has stopped sending and never reads would otherwise hold it.
        if tokio::time::timeout(CLOSE_LINGER, end.cancelled())
            .await
            .is_err()
        {
            end.cancel();
        }
        drop(slot);
    });
}

/// Why a connection's reader gave up.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("no frame within {0:?} of connecting")]
    HandshakeTimeout(Duration),
}

/// Reads frames from one connection into the main loop, no further ahead of it than
/// `intake` allows (see [`MAX_INTAKE_BYTES`]); the first must arrive within `handshake`.
/// Returns when the connection or the loop ends.
pub(super) async fn read_frames(
    r: impl tokio::io::AsyncRead + Unpin,
    conn: ConnId,
    intake: Arc<Semaphore>,
    handshake: Duration,
    in_tx: &mpsc::UnboundedSender<Input>,
) -> Result<(), ReadError> {
    let mut frames = FramedRead::with_capacity(r, FrameCodec, 256 << 10);
    let first = tokio::time::timeout(handshake, frames.next())
        .await
        .map_err(|_| ReadError::HandshakeTimeout(handshake))?;
    let mut next = first;
    while let Some(frame) = next {
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
        next = frames.next().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
