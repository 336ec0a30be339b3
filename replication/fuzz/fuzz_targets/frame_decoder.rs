//! libFuzzer target: arbitrary bytes into the replication frame decoder (`wire::decode`, and
//! the driver's `FrameCodec` fed in pieces). Input layout: byte 0 = mode (bit 0: seal the
//! rest, i.e. patch magic, version, body length and checksum so mutations reach the bodies;
//! bits 1..3: the piece size for the stream), then the bytes.
//!
//! Checked (`check_frame_input` in replication/tests/fuzz_oracles): no panic; errors are
//! the typed `WireError` a header model predicts; every decoded frame round-trips; the
//! stream yields the same frames and error; no allocation past the frame limits.
//!
//!     cd replication/fuzz && cargo fuzz run -s none frame_decoder -- -dict=frames.dict
#![no_main]

use blockrep_replication_fuzz::alloc::CountingAlloc;
use blockrep_replication_fuzz::{check_frame_input, FrameStats};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fuzz_target!(|data: &[u8]| {
    check_frame_input(data, &mut FrameStats::default());
});
