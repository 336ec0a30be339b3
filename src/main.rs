//! The `blockrep` binary: the command line, and the wiring of the NBD frontend to the
//! storage engine. Errors become one clear line on stderr; usage errors exit with code 2.

mod volume;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blockrep_frontend::{Exports, ListenAddr, Server};
use blockrep_storage::{CreateOptions, Epoch, IoMode, OpenOptions, StorageError, Store};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::volume::LocalVolume;

const DEFAULT_NBD: &str = "127.0.0.1:10809";

#[derive(Parser)]
#[command(
    name = "blockrep",
    version,
    about = "A user-space block device served over NBD"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); RUST_LOG also works.
    #[arg(long, global = true, env = "BLOCKREP_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new volume store in DIR.
    Create {
        dir: PathBuf,
        /// Volume size, like 256MiB or 10GiB (a multiple of 4 KiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Write-ahead log size.
        #[arg(long, value_parser = parse_size, default_value = "256MiB")]
        wal_size: u64,
    },
    /// Serve the volume in DIR over NBD.
    Serve {
        dir: PathBuf,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Print a store's superblock, LSNs and WAL use.
    Inspect {
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write the volume image (after WAL replay) to FILE, offline.
    Export {
        dir: PathBuf,
        file: PathBuf,
        #[arg(long, default_value = "auto")]
        io_engine: IoMode,
    },
    /// Create ./blockrep-data if it is missing and serve it on 127.0.0.1:10809.
    Up {
        #[arg(long, default_value = "blockrep-data")]
        dir: PathBuf,
        /// Size of the volume if it has to be created.
        #[arg(long, value_parser = parse_size, default_value = "1GiB")]
        size: u64,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// Where to listen: host:port or unix:/path (repeatable).
    #[arg(long = "nbd", default_value = DEFAULT_NBD)]
    nbd: Vec<ListenAddr>,
    /// Export name (clients may also use the empty default name).
    #[arg(long, default_value = "blockrep")]
    export: String,
    /// I/O backend: auto (io_uring when available), uring, plain.
    #[arg(long, default_value = "auto")]
    io_engine: IoMode,
    /// Serve at this epoch (default: the stored epoch plus one).
    #[arg(long)]
    epoch: Option<u64>,
    /// Checkpoint interval in milliseconds when the WAL is not filling up.
    #[arg(long, default_value_t = 1000)]
    flush_interval_ms: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{s:?} is not a size like 256MiB or 10GiB ({e})"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockrep: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Create {
            dir,
            size,
            wal_size,
        } => {
            let id = Store::create(
                &dir,
                &CreateOptions {
                    size,
                    wal_capacity: wal_size,
                    volume_id: None,
                },
            )?;
            println!("created volume {id} ({}) in {}", human(size), dir.display());
            Ok(())
        }
        Command::Serve { dir, serve } => serve_store(&dir, &serve),
        Command::Up { dir, size, serve } => {
            if !dir.exists() {
                let id = Store::create(
                    &dir,
                    &CreateOptions {
                        size,
                        wal_capacity: CreateOptions::DEFAULT_WAL_CAPACITY,
                        volume_id: None,
                    },
                )?;
                println!("created volume {id} ({}) in {}", human(size), dir.display());
            }
            serve_store(&dir, &serve)
        }
        Command::Inspect { dir, json } => inspect(&dir, json),
        Command::Export {
            dir,
            file,
            io_engine,
        } => export(&dir, &file, io_engine),
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockrep-rt")
        .build()
        .context("cannot start the async runtime")
}

fn serve_store(dir: &Path, args: &ServeArgs) -> Result<()> {
    let store = Arc::new(Store::open(
        dir,
        &OpenOptions {
            io_mode: args.io_engine,
            flush_interval: Duration::from_millis(args.flush_interval_ms.max(1)),
            read_only: false,
        },
    )?);
    let rt = runtime()?;
    let shutdown = CancellationToken::new();
    // Signal handlers go in before anything is announced, so a SIGTERM sent as soon as the
    // "serving" line appears is a clean stop, never a kill.
    let signals = rt.block_on(async { install_signal_handlers(shutdown.clone()) })?;
    let mut exports = Exports::new();
    exports.add(
        args.export.clone(),
        Arc::new(LocalVolume::new(store.clone())),
    );
    let server = rt.block_on(Server::bind(&args.nbd, exports))?;
    // Only a start that will serve begins a new epoch.
    let epoch = store.begin_epoch(args.epoch.map(Epoch))?;
    let info = store.info();
    for addr in server.local_addrs() {
        let uri = match &addr {
            ListenAddr::Tcp(a) => format!("nbd://{a}/{}", args.export),
            ListenAddr::Unix(p) => format!("nbd+unix:///{}?socket={}", args.export, p.display()),
        };
        println!(
            "blockrep: serving {} ({}, epoch {epoch}, I/O {}) at {uri}",
            dir.display(),
            human(info.volume_size),
            store.io_engine()
        );
    }
    if let Some(ListenAddr::Tcp(a)) = server.local_addrs().first() {
        println!("  try: nbdinfo nbd://{a}   or   qemu-io -f raw nbd://{a} -c 'read 0 4k'");
    }
    rt.block_on(async {
        server.run(shutdown.clone()).await;
        signals.abort();
    });
    drop(rt);
    tracing::info!("shutting down: making acknowledged writes durable");
    store.close().context("closing the store")?;
    Ok(())
}

/// Installs SIGTERM and SIGINT handlers that cancel `shutdown`; must run inside the runtime.
fn install_signal_handlers(shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        shutdown.cancel();
    }))
}

#[derive(serde::Serialize)]
struct Inspection {
    dir: String,
    volume_id: String,
    size: u64,
    block_size: u32,
    epoch: u64,
    checkpoint_lsn: u64,
    clean: bool,
    in_use: bool,
    wal_capacity: u64,
    /// Known only when the store is not in use (it needs a WAL replay).
    wal_used: Option<u64>,
    head_lsn: Option<u64>,
    wal_entries: Option<u64>,
}

fn inspect(dir: &Path, json: bool) -> Result<()> {
    let sb = Store::read_superblock(dir)?;
    let opened = Store::open(
        dir,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    );
    let (in_use, live) = match opened {
        Ok(store) => (false, Some(store)),
        Err(StorageError::Locked(_)) => (true, None),
        Err(e) => return Err(e.into()),
    };
    let r = Inspection {
        dir: dir.display().to_string(),
        volume_id: sb.volume_id.to_string(),
        size: sb.volume_size,
        block_size: sb.block_size,
        epoch: sb.epoch.0,
        checkpoint_lsn: sb.checkpoint_lsn.0,
        clean: sb.is_clean(),
        in_use,
        wal_capacity: sb.wal_capacity,
        wal_used: live.as_ref().map(|s| s.info().wal_used),
        head_lsn: live.as_ref().map(|s| s.info().next_lsn.prev().0),
        wal_entries: live.as_ref().map(|s| s.replay_outcome().entries),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("store          {}", r.dir);
    println!("volume         {}", r.volume_id);
    println!("size           {} ({} bytes)", human(r.size), r.size);
    println!("block size     {}", r.block_size);
    println!("epoch          {}", r.epoch);
    println!("checkpoint LSN {}", r.checkpoint_lsn);
    match (r.head_lsn, r.wal_used, r.wal_entries) {
        (Some(head), Some(used), Some(entries)) => {
            println!("head LSN       {head}");
            println!(
                "WAL            {} of {} used ({entries} entries after the checkpoint)",
                human(used),
                human(r.wal_capacity)
            );
        }
        _ => println!(
            "WAL            {} (in use by a running server; head LSN unknown)",
            human(r.wal_capacity)
        ),
    }
    println!(
        "state          {}",
        match (r.in_use, r.clean) {
            (true, _) => "open by another process",
            (false, true) => "closed cleanly",
            (false, false) => "not closed cleanly (WAL replayed on open)",
        }
    );
    Ok(())
}

fn export(dir: &Path, file: &Path, io_mode: IoMode) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let store = Store::open(
        dir,
        &OpenOptions {
            io_mode,
            read_only: true,
            ..OpenOptions::default()
        },
    )?;
    let size = store.size();
    let mut out = std::fs::File::create(file).with_context(|| format!("{}", file.display()))?;
    let rt = runtime()?;
    const CHUNK: u64 = 4 << 20;
    let mut at = 0;
    while at < size {
        let n = CHUNK.min(size - at);
        let data = rt.block_on(store.read_contiguous(at, n))?;
        if data.iter().all(|&b| b == 0) {
            // Keep the image sparse.
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(&data)
                .with_context(|| format!("{}", file.display()))?;
        }
        at += n;
    }
    out.set_len(size)?;
    out.sync_all()?;
    if at != size {
        bail!("short export");
    }
    println!(
        "exported {} ({}) to {}",
        dir.display(),
        human(size),
        file.display()
    );
    Ok(())
}
