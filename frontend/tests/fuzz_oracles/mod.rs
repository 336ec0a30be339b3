//! Oracles and input generators for fuzzing blockrep's NBD frontend.
//!
//! Used by two drivers:
//! * the cargo-fuzz targets in `fuzz_targets/` (libFuzzer, nightly), and
//! * the deterministic stable-toolchain harness `frontend/tests/decoder_fuzz.rs`, which
//!   declares this directory as its module `fuzz_oracles`,
//!
//! so both check exactly the same properties. (The fuzz crate's `Cargo.toml` points its
//! library at this file.) Because of the second use these files must not use `crate::` paths
//! (the modules reach each other through `super::`) and may only use crates that
//! `blockrep-frontend` itself depends on (bytes, tokio, tokio-util).
//!
//! What is checked:
//! * [`check_decoder`]: `RequestDecoder` fed a byte stream in arbitrary pieces never panics,
//!   and behaves exactly like a tiny independent model of the 28-byte request framing: it
//!   returns a request as soon as (and only when) a whole frame is buffered, consumes exactly
//!   that frame, returns every header field unchanged, hands out a WRITE payload whose length
//!   is the header's length (and whose bytes are the frame's), re-encodes to the same bytes,
//!   and refuses a bad magic or an over-long WRITE with the right error.
//! * [`Harness::run`]: a real `Server` (on a Unix socket, serving two 1 MiB RAM volumes) fed
//!   an arbitrary client byte stream never panics, never hangs (it closes the connection
//!   after the client half-closes), never passes a volume a range outside it, and during the
//!   handshake answers every complete option, in order, with well-formed replies that end in
//!   ACK or an error; unknown options get `NBD_REP_ERR_UNSUP`; INFO/GO on an existing export
//!   include `NBD_INFO_EXPORT` with the right size; ABORT is acknowledged and the connection
//!   closed. Bytes after a successful GO / EXPORT_NAME exercise the transmission phase
//!   (requests run against the RAM volume); there only "no panic, no hang" is checked.

mod common;
mod decoder;
pub mod gen;
mod server;
mod transcript;
mod volume;

pub use common::{CASE_TIMEOUT, EXPORT, HEADER_LEN, OTHER_EXPORT, VOLUME_SIZE};
pub use decoder::{check_decoder, split_decoder_input, DecoderStats};
pub use server::Harness;
pub use transcript::{check_transcript, HandshakeStats};
pub use volume::MemVolume;
