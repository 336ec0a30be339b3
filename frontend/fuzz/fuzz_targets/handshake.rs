//! libFuzzer target: the NBD handshake option parser (and, after a successful GO or
//! EXPORT_NAME, the transmission phase) of a real `blockrep_frontend::Server`, fed the input
//! as one client connection's whole byte stream over a Unix socket. The server exports two
//! 1 MiB RAM volumes.
//!
//! Checked (see `Harness::run` / `check_transcript` in frontend/tests/fuzz_oracles): no panic
//! in any server task, no hang (the server closes within 10 s of the client's half-close), no
//! out-of-range volume call, and every complete option answered in order with well-formed
//! replies.
//!
//!     cd frontend/fuzz && cargo +nightly fuzz run handshake -- -max_total_time=60
#![no_main]

use std::sync::Mutex;

use blockrep_frontend_fuzz::Harness;
use libfuzzer_sys::fuzz_target;

/// One server for the whole run. A static (never dropped): dropping the runtime from a
/// thread-local destructor at exit panics inside tokio. Its socket file is swept by the next
/// `Harness::new`.
static HARNESS: Mutex<Option<Harness>> = Mutex::new(None);

fuzz_target!(
    init: {
        // libFuzzer's own main() runs us, so Rust's usual "ignore SIGPIPE" is not in place:
        // a server writing to a client that already left must get EPIPE, not die.
        // SAFETY: installing SIG_IGN for SIGPIPE before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    },
    |data: &[u8]| {
        let mut h = HARNESS.lock().unwrap_or_else(|e| e.into_inner());
        h.get_or_insert_with(Harness::new).run(data);
    }
);
