//! One replica's connection: dialing it (over mutual TLS when the node has peer TLS),
//! reading its frames into the driver's inputs, and the queue of frames waiting to be
//! written to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use super::{Conn, Driver, Input};
use crate::core::primary::Event;
use crate::core::{ReplicaId, SessionId};
use crate::driver::tls::{dial, DialError, PeerStream, PeerTls};
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
        let tls = self.tls.clone();
        let reader = tokio::spawn(run_session(addr, tls, rx, queued.clone(), report));
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

/// Dials `addr` (over TLS when the node has peer TLS, expecting the replica to present its
/// name), then runs the session over whichever stream that gave.
async fn run_session(
    addr: String,
    tls: Option<PeerTls>,
    rx: mpsc::UnboundedReceiver<Frame>,
    queued: Arc<AtomicU64>,
    report: Reporter,
) {
    let name = report.replica.0.clone();
    match dial(tls.as_ref(), &name, &addr, CONNECT_TIMEOUT).await {
        Ok(PeerStream::Plain(stream)) => {
            let (rd, wr) = stream.into_split();
            exchange(rd, wr, rx, queued, report).await
        }
        Ok(PeerStream::Tls(stream)) => {
            let (rd, wr) = tokio::io::split(*stream);
            exchange(rd, wr, rx, queued, report).await
        }
        Err(DialError::Timeout) => report.gone(format!("connecting to {addr} timed out")),
        Err(DialError::Connect(e)) => report.gone(format!("cannot connect to {addr}: {e}")),
        // Counted and logged (once) by the TLS layer; the core sees a plain disconnection.
        Err(DialError::Refused(e)) => report.gone(format!("{addr}: {e}")),
    }
}

/// Starts the writer on `rx`, and reads frames until the connection ends.
async fn exchange(
    rd: impl AsyncRead + Unpin,
    wr: impl AsyncWrite + Unpin + Send + 'static,
    rx: mpsc::UnboundedReceiver<Frame>,
    queued: Arc<AtomicU64>,
    report: Reporter,
) {
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
