//! The transmission phase of one connection.
//!
//! A reader loop decodes requests and starts each one as its own task, so requests are served
//! concurrently and replied to out of order. Replies go through a channel to one writer task,
//! which keeps every reply contiguous on the wire and batches them into few syscalls. A
//! per-connection budget (in 4 KiB units, counting payload and reply data) stops the reader
//! when too much is in flight, so a flood of requests turns into TCP back-pressure rather than
//! memory growth.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::codec::{Reply, Request, RequestDecoder};
use crate::handshake::Negotiated;
use crate::proto::*;
use crate::volume::{BlockVolume, Extent, VolumeError};
use crate::{Observer, Op};

/// 64 MiB of requests in flight per connection, in 4 KiB units.
const BUDGET_UNITS: u32 = 16 << 10;
/// How long a closing connection waits for its in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Extents per BLOCK_STATUS reply (the spec allows 2^20; clients ask again for the rest).
const MAX_EXTENTS: usize = 1 << 16;

struct Ctx<V> {
    volume: Arc<V>,
    size: u64,
    structured: bool,
    base_allocation: bool,
    export: String,
    observer: Arc<dyn Observer>,
}

#[derive(Debug)]
enum End {
    Disconnect,
    Eof,
    Shutdown,
    Broken(String),
}

pub(crate) async fn serve<R, W, V>(
    reader: R,
    writer: W,
    neg: Negotiated<V>,
    shutdown: CancellationToken,
    observer: Arc<dyn Observer>,
    peer: &str,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    V: BlockVolume,
{
    let ctx = Arc::new(Ctx {
        size: neg.volume.size(),
        volume: neg.volume,
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        export: neg.export,
        observer,
    });
    let (tx, rx) = mpsc::unbounded_channel::<(Reply, OwnedSemaphorePermit)>();
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let mut frames = FramedRead::with_capacity(reader, RequestDecoder, 256 << 10);
    let end = loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break End::Shutdown,
            next = frames.next() => next,
        };
        let req = match next {
            None => break End::Eof,
            Some(Err(e)) => break End::Broken(e.to_string()),
            Some(Ok(req)) if req.cmd == CMD_DISC => break End::Disconnect,
            Some(Ok(req)) => req,
        };
        let units = match req.cmd {
            CMD_READ | CMD_WRITE => 1 + req.length / 4096,
            _ => 1,
        }
        .min(BUDGET_UNITS);
        let permit = match budget.clone().acquire_many_owned(units).await {
            Ok(p) => p,
            Err(_) => break End::Broken("budget closed".into()),
        };
        // Most requests finish without waiting (a write lands in memory, a read hits memory
        // or the page cache), so try each one right here first; only those that must wait
        // (FUA, FLUSH, a disk read, a full WAL) become tasks of their own. The permit travels
        // with the reply and is released once the reply is on the wire.
        let mut request = Box::pin(handle(ctx.clone(), req));
        let mut probe = std::task::Context::from_waker(std::task::Waker::noop());
        match request.as_mut().poll(&mut probe) {
            std::task::Poll::Ready(reply) => {
                let _ = tx.send((reply, permit));
            }
            std::task::Poll::Pending => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    // Polling again under the task's own waker re-registers every wake-up
                    // the first poll set up with the no-op waker.
                    let reply = request.await;
                    let _ = tx.send((reply, permit));
                });
            }
        }
    };
    match &end {
        End::Broken(reason) => tracing::warn!(%peer, "closing connection: {reason}"),
        other => tracing::debug!(%peer, "connection ending: {other:?}"),
    }
    // Finish what was started: every request read gets its reply.
    if tokio::time::timeout(DRAIN_TIMEOUT, budget.acquire_many(BUDGET_UNITS))
        .await
        .is_err()
    {
        tracing::warn!(%peer, "in-flight requests did not finish in {DRAIN_TIMEOUT:?}");
    }
    // NBD_CMD_DISC does not require a flush, but clients (nbdcopy without --flush) expect
    // their acknowledged writes to be kept; a flush here is cheap insurance.
    if !matches!(end, End::Shutdown) {
        if let Err(e) = ctx.volume.flush().await {
            tracing::warn!(%peer, "flush at disconnect failed: {e}");
        }
    }
    drop(tx);
    let _ = writer_task.await;
}

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<(Reply, OwnedSemaphorePermit)>,
) {
    let mut w = BufWriter::with_capacity(256 << 10, writer);
    while let Some((reply, permit)) = rx.recv().await {
        if write_reply(&mut w, reply).await.is_err() {
            return;
        }
        drop(permit);
        // Batch whatever else is ready before paying for a flush.
        while let Ok((reply, permit)) = rx.try_recv() {
            if write_reply(&mut w, reply).await.is_err() {
                return;
            }
            drop(permit);
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
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

fn errno(e: &VolumeError) -> u32 {
    match e {
        VolumeError::Io(_) => EIO,
        VolumeError::OutOfRange => EINVAL,
        VolumeError::Invalid(_) => EINVAL,
        VolumeError::ReadOnly => EPERM,
        VolumeError::NotFast => ENOTSUP,
        VolumeError::ShuttingDown => ESHUTDOWN,
    }
}

/// Flags each command accepts. FUA is harmless on anything (clients do send it on reads).
fn allowed_flags(cmd: u16, structured: bool) -> u16 {
    match cmd {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    }
}

async fn handle<V: BlockVolume>(ctx: Arc<Ctx<V>>, req: Request) -> Reply {
    let ctx = &*ctx;
    let started = std::time::Instant::now();
    let result = execute(ctx, &req).await;
    let op = Op::from_cmd(req.cmd);
    let bytes = match op {
        Op::Read | Op::Write => u64::from(req.length),
        _ => 0,
    };
    ctx.observer
        .request(&ctx.export, op, bytes, started.elapsed(), result.is_ok());
    match result {
        Ok(reply) => reply,
        Err((code, msg)) => {
            tracing::debug!(
                cmd = req.cmd,
                offset = req.offset,
                length = req.length,
                "request failed: {msg}"
            );
            if req.cmd == CMD_READ && ctx.structured {
                Reply::structured_error(req.cookie, code, &msg)
            } else {
                Reply::simple(req.cookie, code)
            }
        }
    }
}

type Failure = (u32, String);

fn fail(code: u32, msg: impl Into<String>) -> Failure {
    (code, msg.into())
}

fn from_volume(e: VolumeError) -> Failure {
    (errno(&e), e.to_string())
}

async fn execute<V: BlockVolume>(ctx: &Ctx<V>, req: &Request) -> Result<Reply, Failure> {
    let unknown = req.flags & !allowed_flags(req.cmd, ctx.structured);
    if unknown != 0 {
        return Err(fail(
            EINVAL,
            format!("flags {unknown:#x} not valid for command {}", req.cmd),
        ));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.length);
    let end = req.offset.checked_add(len);
    let inside = end.is_some_and(|e| e <= ctx.size);
    match req.cmd {
        CMD_READ => {
            if !inside {
                return Err(fail(EINVAL, "read past the end of the volume"));
            }
            if req.length > MAX_PAYLOAD {
                return Err(fail(EOVERFLOW, "read larger than the maximum payload"));
            }
            let chunks = ctx
                .volume
                .read(req.offset, req.length)
                .await
                .map_err(from_volume)?;
            Ok(if ctx.structured {
                Reply::structured_read(req.cookie, req.offset, chunks, req.flags & CMD_FLAG_DF != 0)
            } else {
                Reply::simple_read(req.cookie, chunks)
            })
        }
        CMD_WRITE => {
            if !inside {
                return Err(fail(ENOSPC, "write past the end of the volume"));
            }
            ctx.volume
                .write(req.offset, req.payload.clone(), fua)
                .await
                .map_err(from_volume)?;
            Ok(Reply::simple(req.cookie, 0))
        }
        CMD_FLUSH => {
            ctx.volume.flush().await.map_err(from_volume)?;
            Ok(Reply::simple(req.cookie, 0))
        }
        CMD_TRIM => {
            if !inside {
                return Err(fail(EINVAL, "trim past the end of the volume"));
            }
            ctx.volume
                .trim(req.offset, len, fua)
                .await
                .map_err(from_volume)?;
            Ok(Reply::simple(req.cookie, 0))
        }
        CMD_WRITE_ZEROES => {
            if !inside {
                return Err(fail(ENOSPC, "write-zeroes past the end of the volume"));
            }
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            ctx.volume
                .write_zeroes(req.offset, len, may_trim, fast, fua)
                .await
                .map_err(from_volume)?;
            Ok(Reply::simple(req.cookie, 0))
        }
        CMD_CACHE => {
            if !inside {
                return Err(fail(EINVAL, "cache past the end of the volume"));
            }
            ctx.volume
                .cache(req.offset, len)
                .await
                .map_err(from_volume)?;
            Ok(Reply::simple(req.cookie, 0))
        }
        CMD_BLOCK_STATUS => {
            if !ctx.structured || !ctx.base_allocation {
                return Err(fail(EINVAL, "no metadata context was negotiated"));
            }
            if len == 0 || !inside {
                return Err(fail(EINVAL, "block status range is empty or past the end"));
            }
            let extents = ctx
                .volume
                .block_status(req.offset, len)
                .await
                .map_err(from_volume)?;
            let descriptors = describe(&extents, req.flags & CMD_FLAG_REQ_ONE != 0, len);
            if descriptors.is_empty() {
                return Err(fail(EIO, "the volume reported no extents"));
            }
            Ok(Reply::block_status(
                req.cookie,
                BASE_ALLOCATION_ID,
                &descriptors,
            ))
        }
        other => Err(fail(EINVAL, format!("unknown command {other}"))),
    }
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
