//! `--config FILE`: a node's settings in TOML. A flag given on the command line always wins
//! over the file; the file wins over the built-in defaults.
//!
//! ```toml
//! dir = "/var/lib/blockrep/vol1"
//! nbd = ["0.0.0.0:10809"]
//! replica = ["r1=10.0.0.2:10900", "r2=10.0.0.3:10900"]
//! commit = "sync-all"
//! metrics = "127.0.0.1:9810"
//! tls = "require"
//! tls-certificates = "/etc/blockrep/tls"
//! tls-verify-peer = true
//! peer-tls-dir = "/etc/blockrep/peer"
//! name = "primary"
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::Deserialize;

/// Every key a config file may hold; each matches the flag of the same name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub dir: Option<PathBuf>,
    pub nbd: Option<Vec<String>>,
    pub export: Option<String>,
    pub io_engine: Option<String>,
    pub flush_interval_ms: Option<u64>,
    pub replica: Option<Vec<String>>,
    pub commit: Option<String>,
    pub barrier_timeout_ms: Option<u64>,
    pub rebuild_rate: Option<String>,
    pub metrics: Option<String>,
    pub volume_name: Option<String>,
    pub listen: Option<String>,
    pub size: Option<String>,
    pub tls: Option<String>,
    pub tls_certificates: Option<PathBuf>,
    pub tls_verify_peer: Option<bool>,
    /// Accepted only to be refused with the same words as `--tls-psk`.
    pub tls_psk: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
    pub nbd_memory_budget: Option<String>,
    pub nbd_idle_timeout: Option<u64>,
    pub peer_tls_dir: Option<PathBuf>,
    pub name: Option<String>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
    }
}

/// Whether the flag `id` was given on the command line (then the file must not override it).
fn on_command_line(m: &ArgMatches, id: &str) -> bool {
    matches!(m.value_source(id), Some(ValueSource::CommandLine))
}

/// `value` from the file, parsed like the flag, unless the flag was given.
pub fn take<T: std::str::FromStr>(
    m: &ArgMatches,
    id: &str,
    value: &Option<String>,
    current: &mut T,
) -> Result<()>
where
    T::Err: std::fmt::Display,
{
    if on_command_line(m, id) {
        return Ok(());
    }
    if let Some(v) = value {
        match v.parse::<T>() {
            Ok(parsed) => *current = parsed,
            Err(e) => bail!("config key {id}: {v:?}: {e}"),
        }
    }
    Ok(())
}

/// Like [`take`] for repeatable flags: the file's list replaces the default.
pub fn take_list<T: std::str::FromStr>(
    m: &ArgMatches,
    id: &str,
    value: &Option<Vec<String>>,
    current: &mut Vec<T>,
) -> Result<()>
where
    T::Err: std::fmt::Display,
{
    if on_command_line(m, id) {
        return Ok(());
    }
    if let Some(vs) = value {
        let mut parsed = Vec::with_capacity(vs.len());
        for v in vs {
            match v.parse::<T>() {
                Ok(p) => parsed.push(p),
                Err(e) => bail!("config key {id}: {v:?}: {e}"),
            }
        }
        *current = parsed;
    }
    Ok(())
}

/// For options without a default (`Option<T>` flags).
pub fn take_opt<T: std::str::FromStr>(
    m: &ArgMatches,
    id: &str,
    value: &Option<String>,
    current: &mut Option<T>,
) -> Result<()>
where
    T::Err: std::fmt::Display,
{
    if on_command_line(m, id) || value.is_none() {
        return Ok(());
    }
    let mut v: Option<T> = None;
    if let Some(s) = value {
        match s.parse::<T>() {
            Ok(p) => v = Some(p),
            Err(e) => bail!("config key {id}: {s:?}: {e}"),
        }
    }
    *current = v;
    Ok(())
}

/// A size like `256MiB` in a config file.
struct Size(u64);

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Size, String> {
        crate::support::parse_size(s).map(Size)
    }
}

/// Fills a `serve` command's settings from the file where the command line is silent.
pub fn apply_serve(
    m: &ArgMatches,
    f: &ConfigFile,
    dir: &mut Option<PathBuf>,
    a: &mut crate::node::ServeArgs,
) -> Result<()> {
    if dir.is_none() {
        dir.clone_from(&f.dir);
    }
    take_list(m, "nbd", &f.nbd, &mut a.nbd)?;
    take(m, "export", &f.export, &mut a.export)?;
    take(m, "io_engine", &f.io_engine, &mut a.io_engine)?;
    take(
        m,
        "flush_interval_ms",
        &f.flush_interval_ms.map(|v| v.to_string()),
        &mut a.flush_interval_ms,
    )?;
    if !on_command_line(m, "replicas") {
        if let Some(rs) = &f.replica {
            a.replicas = rs
                .iter()
                .map(|r| crate::node::parse_replica(r).map_err(anyhow::Error::msg))
                .collect::<Result<_>>()?;
        }
    }
    take_opt(m, "commit", &f.commit, &mut a.commit)?;
    take(
        m,
        "barrier_timeout_ms",
        &f.barrier_timeout_ms.map(|v| v.to_string()),
        &mut a.barrier_timeout_ms,
    )?;
    let mut rate = Size(a.rebuild_rate);
    take(m, "rebuild_rate", &f.rebuild_rate, &mut rate)?;
    a.rebuild_rate = rate.0;
    take_opt(m, "metrics", &f.metrics, &mut a.observe.metrics)?;
    take_opt(m, "volume_name", &f.volume_name, &mut a.observe.volume_name)?;
    apply_admin_token(m, f, &mut a.observe);
    let mut budget = Size(a.nbd_memory_budget);
    take(m, "nbd_memory_budget", &f.nbd_memory_budget, &mut budget)?;
    a.nbd_memory_budget = budget.0;
    take_opt(
        m,
        "nbd_idle_timeout",
        &f.nbd_idle_timeout.map(|v| v.to_string()),
        &mut a.nbd_idle_timeout,
    )?;
    apply_tls(m, f, &mut a.tls)?;
    apply_peer_tls(m, f, &mut a.peer)
}

/// The mutual TLS keys between nodes (`peer-tls-dir`, `name`).
pub fn apply_peer_tls(
    m: &ArgMatches,
    f: &ConfigFile,
    p: &mut crate::peer_tls::PeerTlsArgs,
) -> Result<()> {
    if !on_command_line(m, "peer_tls_dir") && f.peer_tls_dir.is_some() {
        p.peer_tls_dir.clone_from(&f.peer_tls_dir);
    }
    take_opt(m, "name", &f.name, &mut p.name)
}

/// The `admin-token-file` key (a path, taken as it is).
fn apply_admin_token(m: &ArgMatches, f: &ConfigFile, o: &mut crate::node::ObserveArgs) {
    if !on_command_line(m, "admin_token_file") && f.admin_token_file.is_some() {
        o.admin_token_file.clone_from(&f.admin_token_file);
    }
}

/// The NBD TLS keys (`tls`, `tls-certificates`, `tls-verify-peer`, `tls-psk`).
fn apply_tls(m: &ArgMatches, f: &ConfigFile, t: &mut crate::node::TlsArgs) -> Result<()> {
    take(m, "tls", &f.tls, &mut t.tls)?;
    if !on_command_line(m, "tls_certificates") && f.tls_certificates.is_some() {
        t.tls_certificates.clone_from(&f.tls_certificates);
    }
    if let (false, Some(v)) = (on_command_line(m, "tls_verify_peer"), f.tls_verify_peer) {
        t.tls_verify_peer = v;
    }
    if !on_command_line(m, "tls_psk") && f.tls_psk.is_some() {
        t.tls_psk.clone_from(&f.tls_psk);
    }
    Ok(())
}

/// Fills a `replica` command's settings from the file where the command line is silent.
pub fn apply_replica(
    m: &ArgMatches,
    f: &ConfigFile,
    dir: &mut Option<PathBuf>,
    listen: &mut Option<String>,
    size: &mut Option<u64>,
    io_engine: &mut blockrep_storage::IoMode,
    observe: &mut crate::node::ObserveArgs,
) -> Result<()> {
    if dir.is_none() {
        dir.clone_from(&f.dir);
    }
    take_opt(m, "listen", &f.listen, listen)?;
    let mut s: Option<Size> = None;
    take_opt(m, "size", &f.size, &mut s)?;
    if let Some(Size(v)) = s {
        *size = Some(v);
    }
    take(m, "io_engine", &f.io_engine, io_engine)?;
    take_opt(m, "metrics", &f.metrics, &mut observe.metrics)?;
    take_opt(m, "volume_name", &f.volume_name, &mut observe.volume_name)?;
    apply_admin_token(m, f, observe);
    Ok(())
}
