//! `blockrep status` and `blockrep set-address`: clients of a node's admin endpoint.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blockrep_metrics::StatusReport;

use crate::support::human;

fn url(admin: &str, path: &str) -> String {
    let base = admin.trim_end_matches('/');
    if base.starts_with("http://") {
        format!("{base}{path}")
    } else {
        format!("http://{base}{path}")
    }
}

fn fetch(admin: &str) -> Result<StatusReport> {
    let body = ureq::get(&url(admin, "/v1/status"))
        .call()
        .with_context(|| format!("cannot reach the node's admin endpoint at {admin}"))?
        .body_mut()
        .read_to_string()
        .context("reading the status")?;
    serde_json::from_str(&body).context("the node answered something that is not a status")
}

pub fn show(admin: &str, json: bool, watch: bool) -> Result<()> {
    loop {
        let report = fetch(admin)?;
        let text = if json {
            serde_json::to_string_pretty(&report)?
        } else {
            render(&report)
        };
        if watch {
            // Clear the screen and redraw.
            println!("\x1b[2J\x1b[H{text}");
            std::io::stdout().flush()?;
            std::thread::sleep(Duration::from_secs(1));
        } else {
            println!("{text}");
            return Ok(());
        }
    }
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done as f64 / total as f64) * width as f64).round() as usize
    };
    format!(
        "[{}{}]",
        "#".repeat(filled.min(width)),
        "-".repeat(width - filled.min(width))
    )
}

pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    let mode = r.commit_mode.as_deref().unwrap_or("-");
    out.push_str(&format!(
        "volume {}  {}  epoch {}  commit {mode}\n",
        r.volume, r.role, r.epoch
    ));
    out.push_str(&format!("store  {}\n", r.store));
    out.push_str(&format!(
        "LSN    head {}  durable {}  committed {}  checkpoint {}\n",
        r.head_lsn, r.durable_lsn, r.committed_lsn, r.checkpoint_lsn
    ));
    out.push_str(&format!(
        "WAL    {} of {} used\n",
        human(r.wal_used_bytes),
        human(r.wal_capacity_bytes)
    ));
    if let Some(e) = r.fenced_by {
        out.push_str(&format!(
            "FENCED by epoch {e}: this primary refuses every write\n"
        ));
    }
    if r.rebuilding {
        out.push_str("REBUILDING: this store's contents are incomplete\n");
    }
    if !r.replicas.is_empty() {
        out.push_str(&format!(
            "\n{:<10} {:<22} {:<14} {:>10} {:>9} {:>10} {:>8}  {}\n",
            "replica", "address", "state", "durable", "lag LSN", "lag", "lag s", "reason"
        ));
        for p in &r.replicas {
            out.push_str(&format!(
                "{:<10} {:<22} {:<14} {:>10} {:>9} {:>10} {:>8.2}  {}\n",
                p.name,
                p.address,
                p.state,
                p.durable_lsn,
                p.lag_lsn,
                human(p.lag_bytes),
                p.lag_seconds,
                p.reason
            ));
            if let Some(b) = &p.rebuild {
                let pct = if b.bytes_total > 0 {
                    100.0 * b.bytes_done as f64 / b.bytes_total as f64
                } else {
                    0.0
                };
                let eta = b
                    .eta_seconds
                    .map_or("-".to_string(), |s| format!("{s:.0} s"));
                out.push_str(&format!(
                    "           rebuild {} {pct:5.1}%  {} of {}  ETA {eta}\n",
                    bar(b.bytes_done, b.bytes_total, 30),
                    human(b.bytes_done),
                    human(b.bytes_total)
                ));
            }
        }
    }
    out
}

pub fn set_address(admin: &str, replica: &str) -> Result<()> {
    let Some((name, addr)) = replica.split_once('=') else {
        bail!("{replica:?} is not NAME=HOST:PORT");
    };
    let answer = ureq::put(&url(admin, &format!("/v1/replicas/{name}/address")))
        .send(addr)
        .with_context(|| format!("the primary at {admin} refused the address update"))?
        .body_mut()
        .read_to_string()?;
    print!("{answer}");
    Ok(())
}
