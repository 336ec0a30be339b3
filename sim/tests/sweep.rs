//! The bounded random sweep CI runs: every seed a full faulty history through the real cores,
//! checked after every step, then the liveness phase. Longer sweeps: `blockrep-sim --seeds N`.

use blockrep_sim::{mode_for, run, Config};

/// Seeds per `cargo test` (the issue asks for at least 2,000).
const SEEDS: u64 = 3_000;

#[test]
fn random_sweep_of_faulty_histories_finds_no_violation() {
    let mut failures = Vec::new();
    for seed in 0..SEEDS {
        if let Err(f) = run(Config::new(seed, mode_for(seed)), false) {
            failures.push(format!(
                "seed {seed} ({}): {}\n    replay: cargo run --release -p blockrep-sim -- --seed {seed} --mode {}",
                f.mode, f.violation, f.mode
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
