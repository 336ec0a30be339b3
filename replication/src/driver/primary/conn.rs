//! One replica's connection: dialing it, reading its frames into the driver's inputs, and
//! the queue of frames waiting to be written to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use super::{Conn, Driver, Input};
use crate::core::primary::Event;
use crate::core::{ReplicaId, SessionId};
use crate::driver::{millis, FrameCodec, CONNECT_TIMEOUT};
use crate::wire::Frame;

/// Who a connection reports to, and as which session.
#[derive(Clone)]
struct Reporter {
    replica: ReplicaId,
    session: SessionId,
    in_tx: mpsc::UnboundedSender<Input>,
    start: tokio::time::Instant,
}

impl Reporter {
    /// Hands `event` to the driver; false once the driver is gone.
    fn send(&self, event: Event) -> bool {
        self.in_tx.send(Input::Event(event)).is_ok()
    }

    fn gone(&self, reason: String) {
        self.send(Event::Disconnected {
            replica: self.replica.clone(),
            session: self.session,
            now: millis(self.start),
            reason,
        });
    }
}

impl Driver {
    /// Opens the transport for `session` (replacing any older one of `replica`); the core
    /// hears `Connected`, then every frame, then `Disconnected`.
    pub(super) fn connect(&mut self, replica: ReplicaId, session: SessionId) {
        self.end_conn(&replica);
        let report = Reporter {
            replica: replica.clone(),
            session,
            in_tx: self.in_tx.clone(),
            start: self.start,
        };
        let Some(addr) = self.addrs.get(&replica).cloned() else {
            report.gone("no address configured".into());
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel::<Frame>();
        let queued = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn(run_session(addr, rx, queued.clone(), report));
        self.conns.insert(
            replica,
            Conn {
                session,
                tx,
                queued,
                reader,
            },
        );
    }

    /// Ends `replica`'s transport, if it has one.
    pub(super) fn end_conn(&mut self, replica: &ReplicaId) {
        if let Some(old) = self.conns.remove(replica) {
            old.end();
        }
    }
}

/// Dials `addr`, starts the writer on `rx`, and reads frames until the connection ends.
async fn run_session(
    addr: String,
    rx: mpsc::UnboundedReceiver<Frame>,
    queued: Arc<AtomicU64>,
    report: Reporter,
) {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return report.gone(format!("cannot connect to {addr}: {e}")),
        Err(_) => return report.gone(format!("connecting to {addr} timed out")),
    };
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    tokio::spawn(crate::driver::write_frames(wr, rx, move |sent| {
        queued.fetch_sub(sent, Ordering::Relaxed);
    }));
    report.send(Event::Connected {
        replica: report.replica.clone(),
        session: report.session,
        now: millis(report.start),
    });
    let mut frames = FramedRead::with_capacity(rd, FrameCodec, 64 << 10);
    let reason = loop {
        match frames.next().await {
            Some(Ok(frame)) => {
                let ev = Event::Received {
                    replica: report.replica.clone(),
                    session: report.session,
                    frame,
                    now: millis(report.start),
                };
                if !report.send(ev) {
                    return;
                }
            }
            Some(Err(e)) => break format!("bad frame from replica: {e}"),
            None => break "replica closed the connection".to_string(),
        }
    };
    report.gone(reason);
}
