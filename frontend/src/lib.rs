//! blockrep-frontend: the NBD server.
//!
//! It owns the NBD protocol: the fixed-newstyle handshake (EXPORT_NAME, INFO, GO, LIST, ABORT,
//! STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`, STARTTLS), the transmission phase
//! (pipelined requests served concurrently with out-of-order replies), listeners on TCP and
//! Unix sockets, and graceful shutdown. It serves anything that implements the small
//! [`BlockVolume`] trait.
//!
//! It must never know how the bytes are stored or replicated: no WAL, no LSN, no replica
//! appears here. Durability is whatever the volume's `flush` promises.
//!
//! Modules, each importing only those listed before it (no module imports one that imports
//! it, and none imports this root): `proto` (the spec's numbers), `volume` (the
//! [`BlockVolume`] trait), `exports` (exports by name), `observe` (metrics hooks), `tls`
//! (a certificate directory loaded into a rustls acceptor), `stream` (a plain or TLS
//! socket), `codec` (request framing), `reply` (reply encoding), `command` (a request decoded into a typed command),
//! `option` (a handshake option decoded into a typed option), `handshake`, `budget` (the
//! memory budget, per connection and server-wide), `intake` (reading requests under the
//! budget), `connection` (the transmission phase, idle timeout, shutdown grace) and `server`
//! (listeners, accept loop, shutdown).

mod budget;
mod codec;
mod command;
mod connection;
mod exports;
mod handshake;
mod intake;
mod observe;
mod option;
pub mod proto;
mod reply;
mod server;
mod stream;
mod tls;
mod volume;

pub use budget::DEFAULT_MEMORY_BUDGET;
pub use codec::{encode_request, DecodeError, Request, RequestDecoder};
pub use connection::SHUTDOWN_GRACE;
pub use exports::Exports;
pub use observe::{NoObserver, Observer, Op};
pub use server::{ListenAddr, Server, ServerError};
pub use tls::{Tls, TlsError, TlsMode};
pub use volume::{BlockVolume, Extent, ReadChunk, VolumeError, VolumeResult};
