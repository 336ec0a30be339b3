//! Full filesystems under replicas: the random sweep with a fault that fills a node's
//! filesystem (as a replica it then refuses entries and base data, `Reject(NoSpace)`) and
//! one that frees every filesystem again. No acknowledged FLUSH may be lost, and once
//! faults stop (and space is freed) the cluster converges as before.

use blockrep_sim::{mode_for, run, Config};

#[test]
fn random_sweep_with_replica_filesystems_filling_finds_no_violation() {
    let mut failures = Vec::new();
    let mut refused = 0;
    for seed in 0..300 {
        let mut cfg = Config::new(seed, mode_for(seed));
        cfg.faults.fill = 0.01;
        cfg.faults.free = 0.02;
        match run(cfg, false) {
            Ok(stats) => refused += stats.refused_for_space,
            Err(f) => failures.push(format!("seed {seed} ({}): {}", f.mode, f.violation)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The fault must really have been met, or this sweep proves little.
    eprintln!("{refused} refusals for space");
    assert!(
        refused > 100,
        "only {refused} refusals for space in the sweep"
    );
}

#[test]
fn random_sweep_in_the_etcd_led_mode_with_replica_filesystems_filling_finds_no_violation() {
    let mut failures = Vec::new();
    for seed in 0..150 {
        let mut cfg = Config::new(seed, mode_for(seed));
        cfg.control = Some(blockrep_sim::ControlConfig::default());
        cfg.faults.failover = 0.0;
        cfg.faults.fill = 0.01;
        cfg.faults.free = 0.02;
        if let Err(f) = run(cfg, false) {
            failures.push(format!("seed {seed} ({}): {}", f.mode, f.violation));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
