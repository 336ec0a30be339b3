//! Reading one connection's requests off the socket under the memory budget.
//!
//! A request's budget is taken as soon as its header is in, before the rest of a WRITE
//! payload is read: a payload the budget has no room for stays in the client's socket (TCP
//! back-pressure), not in our memory. Without this, the decoder would buffer up to
//! `MAX_PAYLOAD` per connection before any budget was asked for. Reads ahead (which let many
//! small requests arrive in one syscall) stop at [`READ_AHEAD`] bytes, and the rest of a
//! payload that did not fit in them is read exactly, with nothing after it.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::Decoder;

use crate::budget::{BudgetClosed, ConnectionBudget, Units};
use crate::codec::{DecodeError, Request, RequestDecoder, REQUEST_HEADER_LEN};

/// At most this much of what a client sent is read before its budget is taken.
pub(crate) const READ_AHEAD: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub(crate) enum IntakeError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Budget(#[from] BudgetClosed),
    #[error("the client closed the connection in the middle of a request")]
    Truncated,
}

/// The reading half of a connection, with what was read of the next requests.
pub(crate) struct Intake<R> {
    reader: R,
    buf: BytesMut,
    /// `buf` is one WRITE's own buffer, of exactly its size (see `next`).
    exact: bool,
}

impl<R: AsyncRead + Unpin> Intake<R> {
    pub fn new(reader: R) -> Intake<R> {
        Intake {
            reader,
            buf: BytesMut::with_capacity(READ_AHEAD),
            exact: false,
        }
    }

    /// The next request with the budget it holds, or `None` at a clean end of the stream.
    /// Cancel-safe: what was read stays buffered, and budget taken for a request not yet
    /// returned is given back.
    pub async fn next(
        &mut self,
        budget: &ConnectionBudget,
    ) -> Result<Option<(Request, Units)>, IntakeError> {
        let mut units = None;
        loop {
            if let Some(req) = RequestDecoder.decode(&mut self.buf)? {
                if self.exact {
                    // Let the payload own that buffer: reusing it for reading ahead would
                    // keep the whole of it resident after the payload is gone.
                    self.buf = BytesMut::new();
                    self.exact = false;
                }
                let units = match units {
                    Some(u) => u,
                    None => budget.take(req.cmd, req.length).await?,
                };
                return Ok(Some((req, units)));
            }
            let want = if self.buf.len() >= REQUEST_HEADER_LEN {
                // A WRITE whose payload is not all here (the decoder has checked its header,
                // and everything buffered belongs to it): its budget first, then a buffer of
                // its own, freed with the payload.
                let length = announced_length(&self.buf);
                let total = REQUEST_HEADER_LEN + length as usize;
                if units.is_none() {
                    units = Some(budget.take(crate::proto::CMD_WRITE, length).await?);
                }
                if !self.exact {
                    let mut own = BytesMut::with_capacity(total);
                    own.extend_from_slice(&self.buf);
                    self.buf = own;
                    self.exact = true;
                }
                total - self.buf.len()
            } else {
                let want = READ_AHEAD - self.buf.len();
                self.buf.reserve(want);
                want
            };
            let n = (&mut self.reader)
                .take(want as u64)
                .read_buf(&mut self.buf)
                .await
                .map_err(DecodeError::Io)?;
            if n == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(IntakeError::Truncated),
                };
            }
        }
    }
}

/// The length field of the request header at the start of `buf`.
fn announced_length(buf: &[u8]) -> u32 {
    let mut len = [0u8; 4];
    len.copy_from_slice(&buf[24..REQUEST_HEADER_LEN]);
    u32::from_be_bytes(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;
    use crate::codec::encode_request;
    use crate::proto::{CMD_FLUSH, CMD_WRITE};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// The invariant of `budget`: no WRITE payload is read past the read-ahead window before
    /// its request holds budget, so what a connection keeps resident beyond its budget is at
    /// most one window, however large the WRITEs it is sent.
    #[tokio::test]
    async fn resident_payload_never_exceeds_the_budget() {
        let budget = Budget::new(1 << 20);
        let conn = budget.connection();
        let (mut client, server) = tokio::io::duplex(8 << 20);
        let mut wire = BytesMut::new();
        for cookie in 0..3 {
            let req = Request::sample(CMD_WRITE, 0, cookie, 0, 4 << 20);
            encode_request(&req, &mut wire);
        }
        encode_request(&Request::sample(CMD_FLUSH, 0, 9, 0, 0), &mut wire);
        let sender = tokio::spawn(async move {
            client.write_all(&wire).await.unwrap();
            client
        });
        let mut intake = Intake::new(server);
        let (first, held) = intake.next(&conn).await.unwrap().unwrap();
        assert_eq!(first.payload.len(), 4 << 20);
        // The first WRITE holds the whole (1 MiB) budget: the second must wait with no more
        // than a read-ahead window of its payload read.
        let waiting = tokio::time::timeout(Duration::from_millis(300), intake.next(&conn)).await;
        assert!(waiting.is_err(), "a request was read with no budget left");
        assert!(
            intake.buf.len() <= READ_AHEAD,
            "{} bytes read",
            intake.buf.len()
        );
        drop(held);
        drop(first);
        for cookie in 1..3 {
            let (req, _units) = intake.next(&conn).await.unwrap().unwrap();
            assert_eq!((req.cookie, req.payload.len()), (cookie, 4 << 20));
        }
        let (flush, _units) = intake.next(&conn).await.unwrap().unwrap();
        assert_eq!(flush.cmd, CMD_FLUSH);
        // A payload's own buffer went with it; reading ahead never reuses it.
        assert!(
            intake.buf.capacity() <= READ_AHEAD,
            "{}",
            intake.buf.capacity()
        );
        drop(sender.await.unwrap());
        assert!(intake.next(&conn).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_request_is_truncated() {
        let conn = Budget::new(1 << 20).connection();
        let mut wire = BytesMut::new();
        encode_request(&Request::sample(CMD_WRITE, 0, 1, 0, 8192), &mut wire);
        let mut intake = Intake::new(&wire[..4000]);
        assert!(matches!(
            intake.next(&conn).await,
            Err(IntakeError::Truncated)
        ));
    }
}
