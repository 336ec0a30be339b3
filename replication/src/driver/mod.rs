//! The tokio driver: runs the sans-IO core over TCP. It owns sockets, timers and the store;
//! the core owns every decision. The primary's loop (`primary`), the replica's (`replica`)
//! and a promotion's probes (`promotion`) each have a module; the framing over a byte
//! stream they share is here.

pub mod primary;
pub mod promotion;
pub mod replica;
pub mod tls;

use std::time::Duration;

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::wire::{self, Frame, WireError};

/// Dialing a replica gives up after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The most a frame's header alone makes the decoder reserve ahead of what has arrived:
/// enough for a live-shipping frame (1 MiB of entries and their headers) or a base chunk
/// in one go, as before.
///
/// Past it the buffer grows with what arrives (each reserve at most what is there already,
/// and never past the declared frame, itself capped at [`wire::MAX_BODY`]), so a peer
/// that declares a large frame and sends no more of it holds about what it sent, not the
/// frame's size: the connections under a replica's cap cannot reserve the frame cap each.
pub const RESERVE_AHEAD: usize = (1 << 20) + (64 << 10);

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
            src.reserve((len - src.len()).min(src.len().max(RESERVE_AHEAD)));
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

/// Writes every frame `rx` yields to `w`: each frame and those already waiting behind it
/// in as few vectored writes as the socket takes, payloads never copied. After each such
/// batch, `written` gets the batch's [`Frame::queued_size`]. Returns when `rx` closes or a
/// write fails.
pub(crate) async fn write_frames(
    mut w: impl tokio::io::AsyncWrite + Unpin,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Frame>,
    mut written: impl FnMut(u64),
) {
    let mut parts = Vec::new();
    while let Some(frame) = rx.recv().await {
        let mut sent = frame.queued_size();
        crate::wire::encode_parts(&frame, &mut parts);
        while let Ok(frame) = rx.try_recv() {
            sent += frame.queued_size();
            crate::wire::encode_parts(&frame, &mut parts);
        }
        if write_parts(&mut w, &mut parts).await.is_err() {
            return;
        }
        written(sent);
    }
}

/// Writes `parts` in order with as few vectored writes as the socket takes, and empties it.
pub(crate) async fn write_parts(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    parts: &mut Vec<bytes::Bytes>,
) -> std::io::Result<()> {
    use bytes::Buf;
    use tokio::io::AsyncWriteExt;
    /// Linux refuses more iovecs than this in one call.
    const MAX_IOVECS: usize = 1024;
    let mut first = 0;
    loop {
        // Empty parts have nothing to write (and a write of nothing would look like EOF).
        while parts.get(first).is_some_and(|p| p.is_empty()) {
            first += 1;
        }
        if first == parts.len() {
            break;
        }
        let mut written = {
            let slices: Vec<std::io::IoSlice<'_>> = parts[first..]
                .iter()
                .take(MAX_IOVECS)
                .map(|p| std::io::IoSlice::new(p))
                .collect();
            w.write_vectored(&slices).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let part = &mut parts[first];
            if written >= part.len() {
                written -= part.len();
                first += 1;
            } else {
                part.advance(written);
                written = 0;
            }
        }
    }
    parts.clear();
    Ok(())
}

/// Milliseconds since `start`, the core's notion of time.
pub(crate) fn millis(start: tokio::time::Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

#[cfg(test)]
mod codec_tests;
