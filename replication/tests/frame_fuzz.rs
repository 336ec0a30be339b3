//! Deterministic, stable-toolchain fuzzing of the replication frame decoder and the replica
//! core.
//!
//! The coverage-guided targets live in `replication/fuzz` (cargo fuzz, libFuzzer). This
//! harness runs the *same* oracles (`replication/tests/fuzz_oracles/`) over inputs from a
//! seeded generator, so every `cargo test` checks them without cargo-fuzz:
//!
//! * `frame_fuzz_decoder_survives_random_frames`: encoded frames of every kind, valid or flipped,
//!   cut, resized, re-kinded (mostly resealed so their bodies get parsed), streams of
//!   several, and garbage, through `wire::decode` and the driver's `FrameCodec`.
//! * `frame_fuzz_replica_core_survives_random_sessions`: a replica taken through a valid handshake,
//!   then fed near-valid frame sequences built from random bytes by the fuzz target's own
//!   script.
//!
//! (Every test's name starts with `frame_fuzz`, so `./scripts/test frame_fuzz` runs them
//! and the replication fuzz targets.)
//!
//! Knobs: `BLOCKREP_FUZZ_FRAME_CASES`, `BLOCKREP_FUZZ_REPLICA_CASES` (counts),
//! `BLOCKREP_FUZZ_SEED` (a failure prints the seed and case; the same seed replays it).

#[allow(dead_code, unused_imports)]
mod fuzz_oracles;

use arbitrary::Unstructured;
use fuzz_oracles::alloc::CountingAlloc;
use fuzz_oracles::gen::{frame_case, Rng};
use fuzz_oracles::{check_frame_input, split_frame_input, FrameStats, Harness, ReplicaStats};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

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

/// The input of the `replica_core` target for case `i`: random bytes, of a random length.
fn replica_input(rng: &mut Rng) -> Vec<u8> {
    let n = 16 + rng.below(1500) as usize;
    rng.bytes(n)
}

#[test]
fn frame_fuzz_decoder_survives_random_frames() {
    let seed = seed();
    let cases = env_u64("BLOCKREP_FUZZ_FRAME_CASES", 20_000);
    let mut rng = Rng::new(seed);
    let mut stats = FrameStats::default();
    for i in 0..cases {
        let input = frame_case(&mut rng);
        case("frame decoder", seed, i, || {
            check_frame_input(&input, &mut stats)
        });
    }
    eprintln!("frame decoder fuzz (seed {seed:#x}): {stats:?}");
    // The generator must keep reaching every outcome, or this test proves little.
    if cases >= 10_000 {
        let some = cases / 200;
        assert!(stats.decoded > cases / 4, "{stats:?}");
        assert!(
            stats.by_kind[1..].iter().all(|&n| n > some / 4),
            "{stats:?}"
        );
        for n in [
            stats.short,
            stats.bad_header,
            stats.wrong_length,
            stats.bad_checksum,
            stats.unknown_kind,
            stats.malformed_body,
            stats.bad_entry,
        ] {
            assert!(n > some, "{stats:?}");
        }
        assert!(stats.stream_frames > stats.decoded, "{stats:?}");
        // The counting allocator is installed, and a huge declared length made the codec
        // reserve a large buffer at least once (so the bound is really exercised).
        assert!(stats.largest_decode_alloc > 0, "{stats:?}");
        assert!(stats.largest_codec_alloc > 1 << 20, "{stats:?}");
    }
}

#[test]
fn frame_fuzz_decoder_input_layout() {
    let (mode, rest) = split_frame_input(&[0b0000_0101, 0xaa]);
    assert!(mode.seal);
    assert_eq!(mode.piece, 3);
    assert_eq!(rest, &[0xaa]);
    assert_eq!(mode.byte(), 0b101);
    let (mode, rest) = split_frame_input(&[]);
    assert!(!mode.seal && rest.is_empty());
}

#[test]
fn frame_fuzz_replica_core_survives_random_sessions() {
    let seed = seed();
    let cases = env_u64("BLOCKREP_FUZZ_REPLICA_CASES", 2_000);
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut total = ReplicaStats::default();
    for i in 0..cases {
        let input = replica_input(&mut rng);
        case("replica core", seed, i, || {
            let s = Harness::run(&mut Unstructured::new(&input));
            add(&mut total, &s);
        });
    }
    eprintln!("replica core fuzz (seed {seed:#x}): {total:?}");
    if cases >= 1_000 {
        let t = &total;
        assert_eq!(t.cases, cases);
        assert!(t.appended > cases * 2, "{t:?}");
        assert!(t.acks > cases, "{t:?}");
        assert!(t.refused_by_decoder > cases / 2, "{t:?}");
        assert!(t.refused_by_core > cases, "{t:?}");
        for n in [t.rebuilds, t.base_chunks, t.cuts, t.new_epochs, t.full] {
            assert!(n > cases / 20, "{t:?}");
        }
        for reason in ["StaleEpoch", "Gap", "BadEntry", "Protocol", "WrongVolume"] {
            assert!(
                t.reasons.get(reason).copied().unwrap_or(0) > 10,
                "{reason}: {t:?}"
            );
        }
    }
}

fn add(total: &mut ReplicaStats, s: &ReplicaStats) {
    total.cases += s.cases;
    total.frames += s.frames;
    total.refused_by_decoder += s.refused_by_decoder;
    total.refused_by_core += s.refused_by_core;
    for (k, v) in &s.reasons {
        *total.reasons.entry(k.clone()).or_default() += v;
    }
    total.appended += s.appended;
    total.acks += s.acks;
    total.rebuilds += s.rebuilds;
    total.base_chunks += s.base_chunks;
    total.cuts += s.cuts;
    total.new_epochs += s.new_epochs;
    total.full += s.full;
}

/// A target's input generator.
type Generator = fn(&mut Rng) -> Vec<u8>;

/// Writes generator cases as seed corpora for the cargo-fuzz targets (libFuzzer would take
/// long to find a sealed frame of every kind on its own). By default into a temporary
/// directory, which checks that the corpus can be written; `scripts/test` seeds cargo fuzz
/// with
///
///     BLOCKREP_FUZZ_WRITE_SEEDS=fuzz/corpus cargo test -p blockrep-replication \
///         --test frame_fuzz write_seed_corpus
///
/// (a relative path is relative to `replication/`; `fuzz/corpus` is git-ignored).
#[test]
fn frame_fuzz_write_seed_corpus() {
    let tmp = std::env::temp_dir().join(format!("blockrep-repl-seeds-{}", std::process::id()));
    let dir = std::env::var_os("BLOCKREP_FUZZ_WRITE_SEEDS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.clone());
    let mut rng = Rng::new(seed());
    let targets: [(&str, Generator); 2] = [
        ("frame_decoder", frame_case),
        ("replica_core", replica_input),
    ];
    for (target, case) in targets {
        let at = dir.join(target);
        std::fs::create_dir_all(&at).unwrap();
        for i in 0..200 {
            std::fs::write(at.join(format!("seed-{i:03}")), case(&mut rng)).unwrap();
        }
        let n = std::fs::read_dir(&at).unwrap().count();
        assert!(n >= 200, "{target}: {n} seeds");
    }
    eprintln!("wrote 200 + 200 seeds under {}", dir.display());
    let _ = std::fs::remove_dir_all(&tmp);
}
