//! The transmission phase of one connection.
//!
//! One task reads the requests, decodes each once into a typed [`Command`] and polls it once
//! right there. Most finish without waiting (a write lands in memory, a read hits memory or
//! the page cache) and their reply is queued at once; only a request that has to wait (FUA,
//! FLUSH, a disk read, a full WAL) becomes a task of its own, so requests are still served
//! concurrently and replied to out of order. Replies go through a channel to one writer task,
//! which keeps every reply contiguous on the wire and batches them into few syscalls. The
//! memory budget (`budget`: the connection's own and the server's global one) stops the
//! reader when too much is in flight, so a flood of requests turns into TCP back-pressure
//! rather than memory growth. A connection idle past the idle timeout is closed; one told to
//! shut down gets its grace ([`SHUTDOWN_GRACE`] unless the server says otherwise) to answer
//! what it has read, then is dropped.

use std::future::Future;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, ConnectionBudget, Units};
use crate::command::{Command, Header, Limits, Refusal};
use crate::handshake::Negotiated;
use crate::intake::Intake;
use crate::observe::{Observer, Op};
use crate::proto::*;
use crate::reply::Reply;
use crate::volume::{BlockVolume, Extent, VolumeError};

/// How long a closing connection waits for its in-flight requests and their replies.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection may take, once the server is told to shut down, to finish the
/// requests it has read and put their replies on the wire. Past it the connection is dropped
/// (a client that stopped reading cannot hold a shutdown up), so a server stops within this
/// of being told to, whatever its clients do. Writes acknowledged before are kept: the
/// volume's owner makes them durable when it closes.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Extents per BLOCK_STATUS reply (the spec allows 2^20; clients ask again for the rest).
const MAX_EXTENTS: usize = 1 << 16;

/// The server-wide bounds every connection is held to.
#[derive(Clone)]
pub(crate) struct Bounds {
    pub budget: Budget,
    /// A connection idle this long (nothing in flight, no request and no reply) is closed.
    pub idle_timeout: Option<Duration>,
    /// How long a connection of a stopping server may still answer what it has read.
    pub shutdown_grace: Duration,
}

struct Ctx<V> {
    volume: Arc<V>,
    limits: Limits,
    export: String,
    observer: Arc<dyn Observer>,
}

type Replies = mpsc::UnboundedSender<(Reply, Units)>;

#[derive(Debug)]
enum End {
    Disconnect,
    Eof,
    Shutdown,
    Idle(Duration),
    Broken(String),
    /// The writer stopped (the socket failed, or it held back a reply; it said why).
    WriterGone,
}

pub(crate) async fn serve<R, W, V>(
    reader: R,
    writer: W,
    neg: Negotiated<V>,
    shutdown: CancellationToken,
    observer: Arc<dyn Observer>,
    bounds: &Bounds,
    peer: &str,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    V: BlockVolume,
{
    let ctx = Arc::new(Ctx {
        limits: Limits {
            size: neg.volume.size(),
            structured: neg.structured,
            base_allocation: neg.base_allocation,
        },
        volume: neg.volume,
        export: neg.export,
        observer,
    });
    let budget = bounds.budget.connection();
    let (tx, rx) = mpsc::unbounded_channel::<(Reply, Units)>();
    let mut writer_task = tokio::spawn(write_replies(writer, rx, ctx.volume.clone()));
    let mut intake = Intake::new(reader);
    let end = read_requests(
        &ctx,
        &mut intake,
        &budget,
        &tx,
        &shutdown,
        bounds.idle_timeout,
    )
    .await;
    match &end {
        End::Broken(reason) => tracing::warn!(%peer, "closing connection: {reason}"),
        End::Idle(after) => {
            tracing::info!(%peer, "closing idle connection: no request for {after:?}")
        }
        other => tracing::debug!(%peer, "connection ending: {other:?}"),
    }
    let shutting_down = matches!(end, End::Shutdown);
    let deadline = tokio::time::Instant::now()
        + if shutting_down {
            bounds.shutdown_grace
        } else {
            DRAIN_TIMEOUT
        };
    // Finish what was started: every request read gets its reply, within the deadline.
    if tokio::time::timeout_at(deadline, budget.drained())
        .await
        .is_err()
    {
        tracing::warn!(%peer, "in-flight requests did not finish in time");
    }
    // NBD_CMD_DISC does not require a flush, but clients (nbdcopy without --flush) expect
    // their acknowledged writes to be kept; a flush here is cheap insurance.
    if !shutting_down {
        if let Err(e) = ctx.volume.flush().await {
            tracing::warn!(%peer, "flush at disconnect failed: {e}");
        }
    }
    drop(tx);
    if tokio::time::timeout_at(deadline, &mut writer_task)
        .await
        .is_err()
    {
        writer_task.abort();
        tracing::warn!(%peer, "dropping the connection: the client did not read its replies in time");
    }
}

/// Reads, decodes and starts requests until the connection ends, and says why it ended.
async fn read_requests<R, V>(
    ctx: &Arc<Ctx<V>>,
    intake: &mut Intake<R>,
    budget: &ConnectionBudget,
    tx: &Replies,
    shutdown: &CancellationToken,
    idle_timeout: Option<Duration>,
) -> End
where
    R: AsyncRead + Unpin,
    V: BlockVolume,
{
    let mut last_request = Instant::now();
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return End::Shutdown,
            _ = tx.closed() => return End::WriterGone,
            after = idle(budget, idle_timeout, last_request) => return End::Idle(after),
            next = intake.next(budget) => next,
        };
        let (req, units) = match next {
            Ok(None) => return End::Eof,
            Err(e) => return End::Broken(e.to_string()),
            Ok(Some(r)) => r,
        };
        last_request = Instant::now();
        let (header, command) = Command::parse(req, &ctx.limits);
        if let Ok(Command::Disconnect) = command {
            return End::Disconnect;
        }
        start(handle(ctx.clone(), header, command), units, tx);
    }
}

/// Resolves with the timeout once the connection has been idle that long: no request in
/// flight, and no request received nor reply sent for that long. Never without a timeout.
async fn idle(
    budget: &ConnectionBudget,
    timeout: Option<Duration>,
    last_request: Instant,
) -> Duration {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let mut at = last_request + timeout;
    loop {
        tokio::time::sleep_until(at.into()).await;
        let now = Instant::now();
        if budget.in_flight() {
            at = now + timeout;
            continue;
        }
        let quiet = last_request.max(budget.last_release());
        if quiet + timeout <= now {
            return timeout;
        }
        at = quiet + timeout;
    }
}

/// Polls a request once on the connection's task and queues its reply if it is ready; one
/// that has to wait becomes a task of its own (see the module doc for why). The budget units
/// travel with the reply and are released once the reply is on the wire.
fn start<F>(request: F, units: Units, tx: &Replies)
where
    F: Future<Output = Reply> + Send + 'static,
{
    let mut request = Box::pin(request);
    let mut probe = std::task::Context::from_waker(Waker::noop());
    match request.as_mut().poll(&mut probe) {
        Poll::Ready(reply) => {
            let _ = tx.send((reply, units));
        }
        Poll::Pending => {
            let tx = tx.clone();
            tokio::spawn(async move {
                // Polling again under the task's own waker re-registers every wake-up the
                // first poll set up with the no-op waker.
                let reply = request.await;
                let _ = tx.send((reply, units));
            });
        }
    }
}

/// Writes replies as they come, batching what is ready into one flush. A success reply
/// leaves only while the volume [`may_acknowledge`](BlockVolume::may_acknowledge), asked
/// again just before the bytes go to the socket; when it may not, the replies not yet sent
/// are dropped with the connection, so the client resends them to whoever serves next.
async fn write_replies<W, V>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<(Reply, Units)>,
    volume: Arc<V>,
) where
    W: AsyncWrite + Unpin,
    V: BlockVolume,
{
    let mut w = BufWriter::with_capacity(256 << 10, writer);
    let may_send = |acknowledges: bool| {
        let may = !acknowledges || volume.may_acknowledge();
        if !may {
            tracing::warn!(
                "dropping the connection: the volume no longer acknowledges, so replies it \
                 answered in time but had not sent yet are not sent"
            );
        }
        may
    };
    while let Some((reply, units)) = rx.recv().await {
        // Batch whatever else is ready before paying for a flush.
        let mut batch = Some((reply, units));
        let mut acknowledges = false;
        while let Some((reply, units)) = batch.take().or_else(|| rx.try_recv().ok()) {
            acknowledges |= reply.acknowledges;
            if !may_send(reply.acknowledges) {
                return close_unsent(w).await;
            }
            if write_reply(&mut w, reply).await.is_err() {
                return;
            }
            drop(units);
        }
        if !may_send(acknowledges) {
            return close_unsent(w).await;
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// Closes the connection's sending side without what is still buffered.
async fn close_unsent<W: AsyncWrite + Unpin>(w: BufWriter<W>) {
    let _ = w.into_inner().shutdown().await;
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    reply: Reply,
) -> std::io::Result<()> {
    for part in reply.parts {
        w.write_all(&part).await?;
    }
    Ok(())
}

/// Why a request failed, and so which NBD error answers it.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("the volume reported no extents")]
    NoExtents,
}

impl Failure {
    fn errno(&self) -> u32 {
        match self {
            Failure::Refused(r) => r.errno(),
            Failure::Volume(VolumeError::Io(_)) => EIO,
            Failure::Volume(VolumeError::OutOfRange | VolumeError::Invalid(_)) => EINVAL,
            Failure::Volume(VolumeError::ReadOnly) => EPERM,
            Failure::Volume(VolumeError::NotFast) => ENOTSUP,
            Failure::Volume(VolumeError::ShuttingDown | VolumeError::LeaseLost) => ESHUTDOWN,
            Failure::Volume(VolumeError::NoSpace(_)) => ENOSPC,
            Failure::NoExtents => EIO,
        }
    }
}

async fn handle<V: BlockVolume>(
    ctx: Arc<Ctx<V>>,
    header: Header,
    command: Result<Command, Refusal>,
) -> Reply {
    let ctx = &*ctx;
    let started = Instant::now();
    let result = match command {
        Ok(command) => execute(ctx, header.cookie, command).await,
        Err(refusal) => Err(Failure::Refused(refusal)),
    };
    let op = Op::from_cmd(header.cmd);
    let bytes = match op {
        Op::Read | Op::Write => u64::from(header.length),
        _ => 0,
    };
    ctx.observer
        .request(&ctx.export, op, bytes, started.elapsed(), result.is_ok());
    match result {
        Ok(reply) => reply.acknowledging(),
        Err(failure) => {
            tracing::debug!(
                cmd = header.cmd,
                offset = header.offset,
                length = header.length,
                "request failed: {failure}"
            );
            // A structured READ can only fail with an error chunk.
            if header.cmd == CMD_READ && ctx.limits.structured {
                Reply::structured_error(header.cookie, failure.errno(), &failure.to_string())
            } else {
                Reply::simple(header.cookie, failure.errno())
            }
        }
    }
}

/// Runs a command that [`Command::parse`] accepted: its range is inside the volume.
async fn execute<V: BlockVolume>(
    ctx: &Ctx<V>,
    cookie: u64,
    command: Command,
) -> Result<Reply, Failure> {
    let volume = &*ctx.volume;
    match command {
        Command::Read { offset, len, df } => {
            let chunks = volume.read(offset, len).await?;
            return Ok(if ctx.limits.structured {
                Reply::structured_read(cookie, offset, chunks, df)
            } else {
                Reply::simple_read(cookie, chunks)
            });
        }
        Command::Write { offset, data, fua } => volume.write(offset, data, fua).await?,
        Command::Flush => volume.flush().await?,
        Command::Trim { offset, len, fua } => volume.trim(offset, len, fua).await?,
        Command::WriteZeroes {
            offset,
            len,
            no_hole,
            fast_zero,
            fua,
        } => {
            volume
                .write_zeroes(offset, len, !no_hole, fast_zero, fua)
                .await?
        }
        Command::Cache { offset, len } => volume.cache(offset, len).await?,
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let extents = volume.block_status(offset, len).await?;
            let descriptors = describe(&extents, req_one, len);
            if descriptors.is_empty() {
                return Err(Failure::NoExtents);
            }
            return Ok(Reply::block_status(
                cookie,
                BASE_ALLOCATION_ID,
                &descriptors,
            ));
        }
        // The reader loop ends the connection at a DISC instead of running it.
        Command::Disconnect => unreachable!("NBD_CMD_DISC is never executed"),
    }
    Ok(Reply::simple(cookie, 0))
}

/// Turns extents into wire descriptors: 32-bit lengths, at most [`MAX_EXTENTS`], one if
/// `req_one` (and then no longer than the request).
fn describe(extents: &[Extent], req_one: bool, len: u64) -> Vec<(u32, u32)> {
    const MAX_LEN: u64 = 0xffff_f000;
    let mut out = Vec::new();
    for e in extents {
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        let mut left = e.length;
        while left > 0 {
            let n = left.min(MAX_LEN);
            out.push((n as u32, flags));
            left -= n;
            if req_one {
                out[0].0 = out[0].0.min(len as u32);
                return out;
            }
            if out.len() >= MAX_EXTENTS {
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_request, Request};
    use crate::observe::NoObserver;
    use crate::volume::{ReadChunk, VolumeResult};
    use bytes::{Buf, Bytes, BytesMut};
    use tokio::io::AsyncReadExt;

    /// 8 KiB of zeroes that accepts every write, and acknowledges until `revoked` (as a
    /// lease running out does).
    #[derive(Default)]
    struct Zeroes {
        revoked: std::sync::atomic::AtomicBool,
    }

    impl BlockVolume for Zeroes {
        fn size(&self) -> u64 {
            8192
        }
        async fn read(&self, _: u64, len: u32) -> VolumeResult<Vec<ReadChunk>> {
            Ok(vec![ReadChunk::Zeroes(len.into())])
        }
        async fn write(&self, _: u64, _: Bytes, _: bool) -> VolumeResult<()> {
            Ok(())
        }
        async fn write_zeroes(
            &self,
            _: u64,
            _: u64,
            _: bool,
            _: bool,
            _: bool,
        ) -> VolumeResult<()> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u64, _: bool) -> VolumeResult<()> {
            Ok(())
        }
        async fn flush(&self) -> VolumeResult<()> {
            Ok(())
        }
        fn may_acknowledge(&self) -> bool {
            !self.revoked.load(std::sync::atomic::Ordering::SeqCst)
        }
        async fn block_status(&self, _: u64, len: u64) -> VolumeResult<Vec<Extent>> {
            Ok(vec![Extent {
                length: len,
                hole: true,
                zero: true,
            }])
        }
    }

    /// (cookie, error, structured error message) of every reply, in order.
    fn replies(mut wire: &[u8]) -> Vec<(u64, u32, Option<String>)> {
        let mut out = Vec::new();
        while !wire.is_empty() {
            match wire.get_u32() {
                SIMPLE_REPLY_MAGIC => {
                    let error = wire.get_u32();
                    out.push((wire.get_u64(), error, None));
                }
                STRUCTURED_REPLY_MAGIC => {
                    let (_flags, kind) = (wire.get_u16(), wire.get_u16());
                    assert_eq!(kind, REPLY_TYPE_ERROR);
                    let cookie = wire.get_u64();
                    let _len = wire.get_u32();
                    let error = wire.get_u32();
                    let n = wire.get_u16() as usize;
                    let msg = String::from_utf8(wire[..n].to_vec()).unwrap();
                    wire.advance(n);
                    out.push((cookie, error, Some(msg)));
                }
                other => panic!("reply magic {other:#x}"),
            }
        }
        out
    }

    /// A refusal is answered like a volume error (an error chunk for a structured READ, a
    /// simple reply otherwise) and the connection goes on; a DISC ends it whatever its flags.
    #[tokio::test]
    async fn refused_requests_get_their_errno_and_the_connection_goes_on() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(server);
        let neg = Negotiated {
            volume: Arc::new(Zeroes::default()),
            export: "t".into(),
            structured: true,
            base_allocation: false,
        };
        let token = CancellationToken::new();
        let served = tokio::spawn(async move {
            let bounds = Bounds {
                budget: Budget::new(crate::budget::DEFAULT_MEMORY_BUDGET),
                idle_timeout: None,
                shutdown_grace: SHUTDOWN_GRACE,
            };
            serve(r, w, neg, token, Arc::new(NoObserver), &bounds, "test").await;
        });
        let mut wire = BytesMut::new();
        for req in [
            Request::sample(CMD_READ, 0, 1, 8192, 1),
            Request::sample(CMD_WRITE, 0, 2, 8000, 512),
            Request::sample(CMD_BLOCK_STATUS, 0, 3, 0, 1),
            Request::sample(CMD_TRIM, CMD_FLAG_DF, 4, 0, 1),
            Request::sample(CMD_WRITE, CMD_FLAG_FUA, 5, 0, 512),
            Request::sample(CMD_DISC, 0xffff, 6, u64::MAX, 0),
        ] {
            encode_request(&req, &mut wire);
        }
        client.write_all(&wire).await.unwrap();
        let mut out = Vec::new();
        // The server closing its end is the condition; the bound only turns a hang into a
        // failure.
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut out))
            .await
            .expect("the connection did not end at DISC")
            .unwrap();
        served.await.unwrap();
        let read_msg = Some("read past the end of the volume".to_string());
        assert_eq!(
            replies(&out),
            vec![
                (1, EINVAL, read_msg),
                (2, ENOSPC, None),
                (3, EINVAL, None),
                (4, EINVAL, None),
                (5, 0, None),
            ]
        );
    }

    /// Invariant: no success reply reaches the socket while the volume may not acknowledge;
    /// error replies still do, and the connection ends at the first success it holds back.
    #[tokio::test]
    async fn no_success_reply_leaves_once_the_volume_may_not_acknowledge() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(server);
        let volume = Arc::new(Zeroes::default());
        let neg = Negotiated {
            volume: volume.clone(),
            export: "t".into(),
            structured: false,
            base_allocation: false,
        };
        let served = tokio::spawn(async move {
            let bounds = Bounds {
                budget: Budget::new(crate::budget::DEFAULT_MEMORY_BUDGET),
                idle_timeout: None,
                shutdown_grace: SHUTDOWN_GRACE,
            };
            let token = CancellationToken::new();
            serve(r, w, neg, token, Arc::new(NoObserver), &bounds, "test").await;
        });
        let send = |req: Request| {
            let mut wire = BytesMut::new();
            encode_request(&req, &mut wire);
            wire
        };
        client
            .write_all(&send(Request::sample(CMD_FLUSH, 0, 1, 0, 0)))
            .await
            .unwrap();
        let mut first = [0u8; 16];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(replies(&first), vec![(1, 0, None)]);

        volume
            .revoked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        client
            .write_all(&send(Request::sample(CMD_READ, 0, 2, 8192, 1)))
            .await
            .unwrap();
        let mut refused = [0u8; 16];
        client.read_exact(&mut refused).await.unwrap();
        assert_eq!(replies(&refused), vec![(2, EINVAL, None)]);
        client
            .write_all(&send(Request::sample(CMD_WRITE, 0, 3, 0, 512)))
            .await
            .unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut rest))
            .await
            .expect("the connection did not end at the held-back reply")
            .unwrap();
        assert_eq!(replies(&rest), vec![], "a success left while it may not");
        // The server may wait for the client's end before it finishes.
        drop(client);
        tokio::time::timeout(Duration::from_secs(30), served)
            .await
            .expect("the connection's server did not end")
            .unwrap();
    }

    #[test]
    fn describe_splits_long_extents_and_honours_req_one() {
        let extents = [
            Extent {
                length: 10 << 30,
                hole: true,
                zero: true,
            },
            Extent {
                length: 4096,
                hole: false,
                zero: false,
            },
        ];
        let d = describe(&extents, false, 1 << 20);
        assert_eq!(
            d.iter().map(|(l, _)| *l as u64).sum::<u64>(),
            (10 << 30) + 4096
        );
        assert!(d.iter().all(|(l, _)| *l > 0));
        assert_eq!(d.last().unwrap().1, 0);
        let one = describe(&extents, true, 1 << 20);
        assert_eq!(one, vec![(1 << 20, STATE_HOLE | STATE_ZERO)]);
    }
}
