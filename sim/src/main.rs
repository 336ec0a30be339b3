//! `blockrep-sim`: sweeps seeds through the simulator, or replays one.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use blockrep_replication::core::CommitMode;
use blockrep_sim::{mode_for, run, Config, ControlConfig, ControlFaults, Failure, Faults, Stats};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "blockrep-sim",
    about = "Deterministic simulation of blockrep's replication protocol"
)]
struct Args {
    /// How many seeds to run (from --start).
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Replay one seed with a full trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Fault set: all (default) or none.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Commit mode: sync-all, sync-quorum, best-effort, or mixed (by seed).
    #[arg(long, default_value = "mixed")]
    mode: String,
    /// Client steps per history.
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Switch on a deliberate protocol bug (needs `--features mutants`); the sweep stops at
    /// the first seed that catches it.
    #[arg(long)]
    mutant: Option<String>,
    /// The etcd-led mode: an etcd in memory and the control-plane core on every node decide
    /// who leads, under the control plane's faults too (etcd cut, down, restored; pauses;
    /// clock drift).
    #[arg(long)]
    control: bool,
    /// With --control: every node runs `--failsafe` (serving on its replicas' word while
    /// etcd is out of reach; a new leader holds renew + ttl/8 before it acknowledges).
    #[arg(long)]
    failsafe: bool,
    /// With --control: no operator forces a failover in the liveness phase, so a history
    /// where the control plane elects no leader that serves fails
    #[arg(long)]
    no_operator: bool,
}

fn config(args: &Args, seed: u64) -> Config {
    let mode = match args.mode.as_str() {
        "mixed" => mode_for(seed),
        m => m.parse::<CommitMode>().unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        }),
    };
    let mut cfg = Config::new(seed, mode);
    cfg.steps = args.steps;
    cfg.faults = if args.faults == "none" {
        Faults::none()
    } else {
        Faults::all()
    };
    if args.control {
        cfg.control = Some(controlled(args));
        // etcd decides failovers in this mode, never the coordinator.
        cfg.faults.failover = 0.0;
    }
    cfg
}

fn controlled(args: &Args) -> ControlConfig {
    let mut control = ControlConfig {
        failsafe: args.failsafe,
        operator_forces_failover: !args.no_operator,
        ..ControlConfig::default()
    };
    if args.faults == "none" {
        control.faults = ControlFaults::none();
    }
    control
}

fn main() {
    let args = Args::parse();
    if let Some(name) = &args.mutant {
        switch_on(name);
    }
    match args.seed {
        Some(seed) => replay(&args, seed),
        None => sweep(&args),
    }
}

/// Replays one seed with its full trace.
fn replay(args: &Args, seed: u64) {
    match run(config(args, seed), true) {
        Ok(stats) => println!("seed {seed}: ok {stats:?}"),
        Err(f) => {
            println!("seed {seed} ({}): VIOLATION {}", f.mode, f.violation);
            std::process::exit(1);
        }
    }
}

/// Runs `--seeds` histories from `--start` and prints the summary; with `--mutant`, stops at
/// the first seed that catches it.
fn sweep(args: &Args) {
    let started = Instant::now();
    let mut progress = Progress::new(args.seeds);
    let mut total = Stats::default();
    let mut failures = 0u64;
    let end = args.start + args.seeds;
    for seed in args.start..end {
        match run(config(args, seed), false) {
            Ok(s) => total.add(&s),
            Err(f) => {
                if let Some(mutant) = &args.mutant {
                    progress.finish();
                    println!(
                        "mutant {mutant} caught by seed {} ({}) after {} histories: {}",
                        f.seed,
                        f.mode,
                        seed - args.start + 1,
                        f.violation
                    );
                    return;
                }
                failures += 1;
                print_failure(args, &f);
            }
        }
        let done = seed - args.start + 1;
        if done.is_multiple_of(100) || seed + 1 == end {
            progress.show(done, started, failures);
        }
    }
    progress.finish();
    print_summary(args.seeds, started, failures, &total);
    if args.mutant.is_some() {
        println!("the mutant survived {} histories", args.seeds);
        std::process::exit(1);
    }
    if failures > 0 {
        std::process::exit(1);
    }
}

fn print_failure(args: &Args, f: &Failure) {
    println!("\nseed {} ({}): VIOLATION {}", f.seed, f.mode, f.violation);
    for line in f.trace.iter().rev().take(40).rev() {
        println!("    {line}");
    }
    println!(
        "    replay: cargo run --release -p blockrep-sim -- --seed {} --mode {} --faults {} --steps {}{}",
        f.seed,
        f.mode,
        args.faults,
        args.steps,
        replay_flags(args)
    );
}

/// The flags besides seed, mode, faults and steps that shape a history, as typed.
fn replay_flags(args: &Args) -> String {
    [
        (args.control, " --control"),
        (args.failsafe, " --failsafe"),
        (args.no_operator, " --no-operator"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, flag)| *flag)
    .collect()
}

fn print_summary(seeds: u64, started: Instant, failures: u64, total: &Stats) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{seeds} histories in {secs:.1} s ({:.0}/s), {failures} failing",
        seeds as f64 / secs
    );
    println!(
        "faults injected: {} crashes, {} connection resets, {} partitions, {} failovers ({} promotions refused)",
        total.crashes, total.resets, total.partitions, total.failovers, total.refused_promotions
    );
    println!(
        "protocol: {} writes, {} flushes acknowledged (each checked against the stores), {} failed, {} catch-ups, {} logs cut in place, {} rebuilds",
        total.writes, total.flushes_ok, total.flushes_failed, total.catch_ups, total.truncations, total.rebuilds
    );
    if total.lease_checked > 0 {
        println!(
            "etcd-led: {} etcd cuts, {} etcd outages, {} etcd restores from a snapshot, {} pauses; {} acknowledgements checked for lease safety; {} failovers an operator had to force in the liveness phase (no leader served)",
            total.etcd_cuts,
            total.etcd_outages,
            total.etcd_restores,
            total.pauses,
            total.lease_checked,
            total.forced_failovers
        );
    }
}

/// The progress bar on stderr, redrawn in place with a carriage return: shown only when
/// stderr is a terminal, so a sweep sent to a file or a pipe gets only the summary.
struct Progress {
    seeds: u64,
    shown: bool,
    on_terminal: bool,
}

impl Progress {
    fn new(seeds: u64) -> Progress {
        Progress {
            seeds,
            shown: false,
            on_terminal: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, done: u64, started: Instant, failures: u64) {
        if !self.on_terminal {
            return;
        }
        let rate = done as f64 / started.elapsed().as_secs_f64();
        let width = 40;
        let filled = (done * width / self.seeds.max(1)) as usize;
        eprint!(
            "\r[{}{}] {done}/{} seeds  {rate:.0}/s  {failures} failing",
            "#".repeat(filled),
            "-".repeat(width as usize - filled),
            self.seeds
        );
        let _ = std::io::stderr().flush();
        self.shown = true;
    }

    /// Ends the progress line, if one was drawn.
    fn finish(&mut self) {
        if self.shown {
            eprintln!();
            self.shown = false;
        }
    }
}

#[cfg(feature = "mutants")]
fn switch_on(name: &str) {
    use blockrep_control::mutants as control;
    use blockrep_replication::mutants::{set, Mutant};
    if let Some(m) = control::Mutant::from_name(name) {
        control::set(Some(m));
        return;
    }
    match Mutant::from_name(name) {
        Some(m) => set(Some(m)),
        None => {
            let names: Vec<&str> = Mutant::ALL
                .iter()
                .map(|m| m.name())
                .chain(control::Mutant::ALL.iter().map(|m| m.name()))
                .collect();
            eprintln!("unknown mutant {name}; one of: {}", names.join(", "));
            std::process::exit(2)
        }
    }
}

#[cfg(not(feature = "mutants"))]
fn switch_on(_: &str) {
    eprintln!("this build has no mutants: build with `--features mutants`");
    std::process::exit(2)
}
