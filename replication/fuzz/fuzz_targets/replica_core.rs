//! libFuzzer target: a `ReplicaCore` over an in-memory store, taken through a valid
//! handshake, then fed the frame sequence the input describes (built with `arbitrary`,
//! biased toward near-valid frames), each encoded and decoded on the way as a real one is.
//!
//! Checked (`Harness::run` in replication/tests/fuzz_oracles): no panic; a refused frame
//! changes no state of the core or the store; epochs and LSNs never go back outside a
//! rebuild or a cut; what the core acknowledges the store has fsynced; core and store agree.
//!
//!     cd replication/fuzz && cargo fuzz run -s none replica_core
#![no_main]

use arbitrary::Unstructured;
use blockrep_replication_fuzz::Harness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    Harness::run(&mut Unstructured::new(data));
});
