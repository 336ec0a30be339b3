//! libFuzzer target: `blockrep_frontend::RequestDecoder` fed arbitrary bytes in arbitrary
//! pieces. Input layout: byte 0 = number of split sizes (mod 8), then that many one-byte split
//! sizes (0 = "all that is left"), then the byte stream itself.
//!
//! Checked (see `check_decoder` in frontend/tests/fuzz_oracles): no panic; a WRITE request's
//! payload length is always the header's length; a request comes out exactly when a whole
//! frame is buffered, with the frame's fields and bytes; bad magic and over-long WRITEs are
//! refused.
//!
//!     cd frontend/fuzz && cargo +nightly fuzz run request_decoder -- -max_total_time=60
#![no_main]

use blockrep_frontend_fuzz::{check_decoder, split_decoder_input, DecoderStats};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (splits, stream) = split_decoder_input(data);
    check_decoder(stream, &splits, &mut DecoderStats::default());
});
