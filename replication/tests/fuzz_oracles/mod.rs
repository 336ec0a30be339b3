//! Oracles and input generators for fuzzing blockrep's replication: the frame decoder and
//! the replica core.
//!
//! Used by two drivers:
//! * the cargo-fuzz targets in `replication/fuzz/fuzz_targets/` (libFuzzer), whose crate
//!   builds this directory as its library, and
//! * the deterministic stable-toolchain harness `replication/tests/frame_fuzz.rs`, which
//!   declares this directory as its module `fuzz_oracles`,
//!
//! so both check exactly the same properties. Because of the second use these files reach
//! each other through `super::`, never `crate::`, and use only crates the replication
//! crate's tests already have (its dependencies and dev-dependencies).
//!
//! What is checked:
//! * [`check_frame_input`]: arbitrary bytes into `wire::decode` and through the driver's
//!   `FrameCodec` in pieces never panic; a failure is the typed `WireError` a small model of
//!   the header predicts (a body error only once the header is sound); every decoded frame
//!   re-encodes to bytes that decode to the same frame; the stream yields exactly the frames
//!   and the error the one-frame decoder does; and no length field makes either allocate
//!   more than the frame limits allow ([`alloc`] measures the largest allocation).
//! * [`Harness::run`]: a `ReplicaCore` over an in-memory store, taken through a valid
//!   handshake and fed near-valid frame sequences, keeps the invariants listed in
//!   `replica.rs` (a refused frame changes nothing; epoch and LSNs never go back outside a
//!   rebuild or a cut; what it acknowledges is durable; core and store agree).

pub mod alloc;
mod frames;
pub mod gen;
mod replica;
mod script;
mod store;

pub use frames::{
    check_frame, check_frame_input, check_round_trip, check_stream, seal, split_frame_input,
    FrameStats, Mode,
};
pub use replica::{Harness, ReplicaStats, MAX_STEPS, VOLUME_SIZE};
pub use script::Step;
pub use store::MemStore;
