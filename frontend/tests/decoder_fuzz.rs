//! Deterministic, stable-toolchain fuzzing of the NBD request decoder and the handshake.
//!
//! The coverage-guided targets live in `frontend/fuzz` (cargo fuzz, nightly + libFuzzer). This
//! harness runs the *same* oracles (`frontend/tests/fuzz_oracles/`) over inputs
//! from a seeded structure-aware generator, so every `cargo test` run checks them on stable:
//!
//! * `decoder_survives_random_streams`: 300 000 request streams (well-formed requests, WRITE
//!   payloads, huge lengths, bad magic, garbage, bit flips, truncations) cut into random
//!   pieces, through `RequestDecoder`.
//! * `handshake_survives_random_clients`: 5 000 whole client byte streams (flags, options,
//!   malformed options, then transmission requests after GO) against a real `Server` on a
//!   Unix socket.
//!
//! Knobs: `BLOCKREP_FUZZ_CASES` / `BLOCKREP_FUZZ_HANDSHAKE_CASES` (counts),
//! `BLOCKREP_FUZZ_SEED` (a different seed explores different inputs; failures print the seed
//! and case number, and the same seed replays them exactly).

#[allow(dead_code, unused_imports)]
mod fuzz_oracles;

use fuzz_oracles::gen::{decoder_case, handshake_case, Rng};
use fuzz_oracles::{check_decoder, split_decoder_input, DecoderStats, Harness};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    env_u64("BLOCKREP_FUZZ_SEED", 0x0b10_c4e9)
}

/// Runs `f` and, if it panics, says which seed and case to replay.
fn case<F: FnOnce()>(what: &str, seed: u64, i: u64, f: F) {
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        eprintln!("{what}: case {i} failed (replay with BLOCKREP_FUZZ_SEED={seed})");
        std::panic::resume_unwind(e);
    }
}

#[test]
fn decoder_survives_random_streams() {
    let seed = seed();
    let cases = env_u64("BLOCKREP_FUZZ_CASES", 300_000);
    let mut rng = Rng::new(seed);
    let mut stats = DecoderStats::default();
    for i in 0..cases {
        let (stream, splits) = decoder_case(&mut rng);
        case("decoder", seed, i, || {
            check_decoder(&stream, &splits, &mut stats)
        });
    }
    eprintln!("decoder fuzz (seed {seed:#x}): {stats:?}");
    // The generator must keep reaching every outcome, or this test proves little.
    if cases >= 10_000 {
        assert!(stats.nonempty_writes > cases / 10, "{stats:?}");
        assert!(stats.requests > cases, "{stats:?}");
        assert!(stats.bad_magic > cases / 100, "{stats:?}");
        assert!(stats.too_large > cases / 100, "{stats:?}");
        assert!(stats.truncated_at_eof > cases / 100, "{stats:?}");
    }
}

#[test]
fn decoder_fuzz_input_layout() {
    // The cargo-fuzz target's input layout: count of split sizes, sizes, stream.
    let (splits, stream) = split_decoder_input(&[2, 5, 0, 0xaa, 0xbb]);
    assert_eq!(splits, vec![5, 0]);
    assert_eq!(stream, &[0xaa, 0xbb]);
    let (splits, stream) = split_decoder_input(&[]);
    assert!(splits.is_empty() && stream.is_empty());
}

#[test]
fn handshake_survives_random_clients() {
    let seed = seed();
    let cases = env_u64("BLOCKREP_FUZZ_HANDSHAKE_CASES", 5_000);
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut h = Harness::new();
    for i in 0..cases {
        let input = handshake_case(&mut rng);
        case("handshake", seed, i, || h.run(&input));
    }
    let stats = h.stats;
    eprintln!("handshake fuzz (seed {seed:#x}): {stats:?}");
    if cases >= 1_000 {
        assert!(stats.transmission > cases / 10, "{stats:?}");
        assert!(stats.acks > cases / 2, "{stats:?}");
        assert!(stats.errors > cases / 10, "{stats:?}");
        assert!(stats.unsupported > cases / 50, "{stats:?}");
        assert!(stats.greeting_only > cases / 50, "{stats:?}");
        assert!(stats.aborts > 0, "{stats:?}");
    }
}

/// Writes generator cases as a seed corpus for the cargo-fuzz targets (libFuzzer finds the
/// 8-byte IHAVEOPT magic slowly on its own; seeds plus `-dict=nbd.dict` fix that). By
/// default into a temporary directory, which checks that the corpus can be written; to seed
/// cargo fuzz:
///
///     BLOCKREP_FUZZ_WRITE_SEEDS=fuzz/corpus cargo test -p blockrep-frontend \
///         --test decoder_fuzz write_seed_corpus
///
/// (a relative path is relative to `frontend/`; `fuzz/corpus` is git-ignored).
#[test]
fn write_seed_corpus() {
    let tmp = std::env::temp_dir().join(format!("blockrep-seeds-{}", std::process::id()));
    let dir = std::env::var_os("BLOCKREP_FUZZ_WRITE_SEEDS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.clone());
    let mut rng = Rng::new(seed());
    let decoder = dir.join("request_decoder");
    std::fs::create_dir_all(&decoder).unwrap();
    let mut written = 0;
    while written < 200 {
        let (stream, splits) = decoder_case(&mut rng);
        if stream.len() > 4000 {
            continue;
        }
        // The target's layout: count of split sizes, one byte each, then the stream.
        let mut input = vec![splits.len() as u8];
        input.extend(splits.iter().map(|&s| s.min(255) as u8));
        input.extend(&stream);
        std::fs::write(decoder.join(format!("seed-{written:03}")), input).unwrap();
        written += 1;
    }
    let handshake = dir.join("handshake");
    std::fs::create_dir_all(&handshake).unwrap();
    let mut written = 0;
    while written < 200 {
        let input = handshake_case(&mut rng);
        if input.len() > 4000 {
            continue;
        }
        std::fs::write(handshake.join(format!("seed-{written:03}")), input).unwrap();
        written += 1;
    }
    for target in ["request_decoder", "handshake"] {
        let n = std::fs::read_dir(dir.join(target)).unwrap().count();
        assert_eq!(n, 200, "{target} seeds");
    }
    eprintln!("wrote 200 + 200 seeds under {}", dir.display());
    let _ = std::fs::remove_dir_all(&tmp);
}
