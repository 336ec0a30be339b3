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
mod command;
mod connection;
mod exports;
mod handshake;
mod observe;
mod option;
pub mod proto;
mod server;
mod volume;

pub use codec::{encode_request, DecodeError, Request, RequestDecoder};
pub use exports::Exports;
pub use observe::{NoObserver, Observer, Op};
pub use server::{ListenAddr, Server, ServerError};
pub use volume::{BlockVolume, Extent, ReadChunk, VolumeError, VolumeResult};
