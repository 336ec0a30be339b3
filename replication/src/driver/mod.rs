//! The tokio driver: runs the sans-IO core over TCP. It owns sockets, timers and the store;
//! the core owns every decision.

pub mod primary;
pub mod replica;

use std::time::Duration;

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::wire::{self, Frame, WireError};

/// Dialing a replica gives up after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Frames over a byte stream.
#[derive(Debug, Default)]
pub struct FrameCodec;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(len) = wire::frame_len(src)? else {
            src.reserve(wire::HEADER_LEN);
            return Ok(None);
        };
        if src.len() < len {
            src.reserve(len - src.len());
            return Ok(None);
        }
        let frame = src.split_to(len).freeze();
        Ok(Some(wire::decode(frame)?))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        wire::encode(&frame, dst);
        Ok(())
    }
}

/// Milliseconds since `start`, the core's notion of time.
pub(crate) fn millis(start: tokio::time::Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Asks the store behind `addr` what it holds (used before a promotion). With `fence`, the
/// member first adopts `epoch` on behalf of that candidate store and stops following its
/// current primary.
pub async fn probe(
    addr: &str,
    epoch: blockrep_storage::Epoch,
    fence: Option<blockrep_storage::VolumeId>,
) -> Result<(blockrep_storage::Epoch, crate::wire::Body), String> {
    use futures_util::{SinkExt, StreamExt};
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("{addr}: timed out"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let (r, w) = stream.into_split();
    let mut sink = tokio_util::codec::FramedWrite::new(w, FrameCodec);
    sink.send(Frame {
        epoch,
        body: crate::wire::Body::Probe { fence },
    })
    .await
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut frames = tokio_util::codec::FramedRead::new(r, FrameCodec);
    match tokio::time::timeout(CONNECT_TIMEOUT, frames.next()).await {
        Ok(Some(Ok(frame))) => Ok((frame.epoch, frame.body)),
        Ok(Some(Err(e))) => Err(format!("{addr}: {e}")),
        Ok(None) => Err(format!("{addr}: closed without answering")),
        Err(_) => Err(format!("{addr}: no answer")),
    }
}
