//! The `blockrep-sim` command line, run as a process.

use std::process::Command;

/// A sweep whose output goes to a file or a pipe gets the summary and no progress bar (the
/// bar is redrawn with carriage returns, which only make sense on a terminal).
#[test]
fn a_sweep_off_a_terminal_prints_the_summary_without_a_progress_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_blockrep-sim"))
        .args(["--seeds", "200", "--steps", "20"])
        .output()
        .expect("run blockrep-sim");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.starts_with("200 histories in "), "{stdout}");
    assert!(stdout.contains("faults injected: "), "{stdout}");
    assert!(
        !stdout.contains('\r') && !stderr.contains('\r'),
        "{stderr:?}"
    );
    assert!(stderr.is_empty(), "{stderr:?}");
}

/// `--control`: the etcd-led mode's sweep, whose summary adds its own faults and checks.
#[test]
fn a_sweep_in_the_etcd_led_mode_reports_its_faults_and_lease_checks() {
    let out = Command::new(env!("CARGO_BIN_EXE_blockrep-sim"))
        .args(["--control", "--seeds", "20", "--steps", "100"])
        .output()
        .expect("run blockrep-sim");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("20 histories in "), "{stdout}");
    assert!(stdout.contains(", 0 failing"), "{stdout}");
    assert!(
        stdout.contains("acknowledgements checked for lease safety"),
        "{stdout}"
    );
}
