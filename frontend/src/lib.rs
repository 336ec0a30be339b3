//! blockrep-frontend: the NBD server.
//!
//! It owns the NBD protocol: the fixed-newstyle handshake (EXPORT_NAME, INFO, GO, LIST, ABORT,
//! STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`), the transmission phase
//! (pipelined requests served concurrently with out-of-order replies), listeners on TCP and
//! Unix sockets, and graceful shutdown. It serves anything that implements the small
//! [`BlockVolume`] trait.
//!
//! It must never know how the bytes are stored or replicated: no WAL, no LSN, no replica
//! appears here. Durability is whatever the volume's `flush` promises.

mod codec;
mod connection;
mod handshake;
pub mod proto;
mod server;
mod volume;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use codec::{encode_request, DecodeError, Request, RequestDecoder};
pub use server::{Exports, ListenAddr, Server, ServerError};
pub use volume::{BlockVolume, Extent, ReadChunk, VolumeError, VolumeResult};

/// Request counters, kept with relaxed atomics so the hot path takes no lock.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub errors: AtomicU64,
    pub requests: [AtomicU64; 8],
    pub bytes: [AtomicU64; 8],
    pub busy_nanos: [AtomicU64; 8],
}

impl ServerStats {
    fn record(&self, cmd: u16, len: u32, took: Duration) {
        let i = usize::from(cmd).min(7);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        if cmd == proto::CMD_READ || cmd == proto::CMD_WRITE {
            self.bytes[i].fetch_add(u64::from(len), Ordering::Relaxed);
        }
        self.busy_nanos[i].fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }
}
