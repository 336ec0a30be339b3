//! Streaming the base image to a rebuilding replica.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockrep_storage::{Epoch, Store};
use tokio::sync::mpsc;

use super::Input;
use crate::core::primary::Event;
use crate::core::{ReplicaId, SessionId};
use crate::driver::millis;
use crate::wire::{Body, Frame};

/// How often a running rebuild reports its progress, at the least.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// One base data frame carries at most this much.
const CHUNK: u64 = 1 << 20;
/// One hole frame covers at most this much.
const MAX_HOLE: u64 = 1 << 30;
/// Base frames queued beyond this wait for the replica to take some.
const MAX_QUEUED: u64 = 16 << 20;

/// Sends the data file, as it is on disk, to a rebuilding replica: data in chunks, holes as
/// ranges. It may be newer than the base (the flusher keeps running); the replica's
/// "WAL wins" rule makes that harmless.
pub(super) struct BaseStream {
    pub(super) store: Arc<Store>,
    /// The session's frame queue, and the bytes waiting in it.
    pub(super) tx: mpsc::UnboundedSender<Frame>,
    pub(super) queued: Arc<AtomicU64>,
    /// The driver's inputs, for progress and the end of the stream.
    pub(super) events: mpsc::UnboundedSender<Input>,
    pub(super) replica: ReplicaId,
    pub(super) session: SessionId,
    /// Bytes of data per second at most (0: no limit).
    pub(super) rate: u64,
    /// Where the stream starts (a resumed rebuild's cursor; 0 otherwise).
    pub(super) from: u64,
    /// The core's clock.
    pub(super) clock: tokio::time::Instant,
}

impl BaseStream {
    pub(super) async fn run(self) {
        let total = self.store.size();
        let epoch = self.store.superblock().epoch;
        let started = tokio::time::Instant::now();
        let mut sent = 0u64;
        let mut last_report = tokio::time::Instant::now();
        let mut reported = self.from;
        let mut at = self.from;
        while at < total {
            let span = (total - at).min(MAX_HOLE);
            let Some((len, data)) = self.store.base_extent(at, span) else {
                break;
            };
            let len = if data { len.min(CHUNK) } else { len };
            let Some(frame) = self.frame(epoch, at, len, data).await else {
                return;
            };
            if !self.queue(frame).await {
                return; // the session ended
            }
            at += len;
            if data {
                sent += len;
                self.pace(sent, started).await;
            }
            // Progress every 64 MiB or every second, whichever comes first: a rate-limited
            // rebuild must not look stalled between reports.
            if at - reported >= 64 << 20 || at == total || last_report.elapsed() >= PROGRESS_EVERY {
                reported = at;
                last_report = tokio::time::Instant::now();
                self.report(Event::BaseProgress {
                    replica: self.replica.clone(),
                    session: self.session,
                    done: at,
                    total,
                    sent,
                });
            }
        }
        tracing::info!(
            replica = %self.replica,
            "base image sent from byte {} ({} MiB of data) in {:.1} s",
            self.from,
            sent >> 20,
            started.elapsed().as_secs_f64()
        );
        self.report(Event::BaseSent {
            replica: self.replica.clone(),
            session: self.session,
        });
    }

    /// The frame for `[at, at+len)`: its data, or a hole. `None` (the session reported gone)
    /// if the data cannot be read.
    async fn frame(&self, epoch: Epoch, at: u64, len: u64, data: bool) -> Option<Frame> {
        let data = if data {
            match self.store.read_base(at, len).await {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    tracing::error!(replica = %self.replica, "cannot read the base image: {e}");
                    self.report(Event::Disconnected {
                        replica: self.replica.clone(),
                        session: self.session,
                        now: millis(self.clock),
                        reason: format!("base image unreadable: {e}"),
                    });
                    return None;
                }
            }
        } else {
            None
        };
        // Asked after the read: a checkpoint raises it before it writes a block, so the data
        // just read reflects no entry after it.
        let body = Body::BaseChunk {
            offset: at,
            length: len,
            reflects: self.store.data_may_hold(),
            data,
        };
        Some(Frame { epoch, body })
    }

    /// Queues `frame` once the replica has room for it; false once the session has ended.
    async fn queue(&self, frame: Frame) -> bool {
        let size = frame.queued_size();
        // Back-pressure: the replica applies base data no faster than it can.
        while self.queued.load(Ordering::Relaxed) > MAX_QUEUED {
            if self.tx.is_closed() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.queued.fetch_add(size, Ordering::Relaxed);
        self.tx.send(frame).is_ok()
    }

    /// Holds the stream to `rate` after `sent` bytes of data since `started`.
    async fn pace(&self, sent: u64, started: tokio::time::Instant) {
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(sent as f64 / self.rate as f64);
        let elapsed = started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }

    fn report(&self, event: Event) {
        let _ = self.events.send(Input::Event(event));
    }
}
