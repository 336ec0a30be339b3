//! The `blockrep` binary: the command line, and the wiring of the NBD frontend, the storage
//! engine and replication. Errors become one clear line on stderr; usage errors exit with 2.

mod certs;
mod config;
mod control;
mod exposure;
mod node;
mod observe;
mod offline;
mod peer_tls;
mod primary;
mod status;
mod support;
mod systemd;
mod volume;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use blockrep_frontend::ListenAddr;
use blockrep_replication::core::CommitMode;
use blockrep_storage::{CreateOptions, IoMode, Store};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::support::{human, parse_size, DEFAULT_NBD};

#[derive(Parser)]
#[command(
    name = "blockrep",
    version,
    about = "A replicated block device served over NBD"
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
    /// Serve the volume in DIR over NBD (as its primary, replicating to --replica nodes).
    Serve {
        /// The store (may come from the config file's `dir`).
        dir: Option<PathBuf>,
        /// Settings in TOML; flags on the command line override them.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        serve: node::ServeArgs,
    },
    /// Run a replica node: receive a primary's WAL into the store in DIR.
    Replica {
        /// The store (may come from the config file's `dir`).
        dir: Option<PathBuf>,
        /// Settings in TOML; flags on the command line override them.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where primaries connect: host:port.
        #[arg(long)]
        listen: Option<String>,
        /// Create a blank store of this size if DIR does not exist (it joins the volume of
        /// the first primary that connects).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[arg(long, default_value = "auto")]
        io_engine: IoMode,
        #[command(flatten)]
        observe: node::ObserveArgs,
        #[command(flatten)]
        peer: node::PeerTlsArgs,
    },
    /// Show a running node's state: LSNs, WAL, and each replica's state, lag and rebuild
    /// progress (read from its admin endpoint).
    Status {
        /// The node's admin endpoint (its --metrics address).
        #[arg(long, default_value = node::DEFAULT_PRIMARY_METRICS)]
        admin: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every second, with progress bars for rebuilds.
        #[arg(long)]
        watch: bool,
    },
    /// Tell a running primary where a replica lives now (NAME=HOST:PORT); it reconnects there
    /// and the replica keeps its identity and progress.
    SetAddress {
        replica: String,
        #[arg(long, default_value = node::DEFAULT_PRIMARY_METRICS)]
        admin: String,
        /// The file with the primary's bearer token (the one its --admin-token-file names).
        #[arg(long, value_name = "FILE")]
        admin_token_file: Option<PathBuf>,
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
    /// Start a primary and two local replicas (sync-all) under ./blockrep-data, creating them
    /// if missing, and serve the volume on 127.0.0.1:10809.
    Up {
        #[arg(long, default_value = "blockrep-data")]
        dir: PathBuf,
        /// Size of the volume if it has to be created.
        #[arg(long, value_parser = parse_size, default_value = "1GiB")]
        size: u64,
        /// Where to serve NBD (repeatable).
        #[arg(long = "nbd", default_value = DEFAULT_NBD)]
        nbd: Vec<ListenAddr>,
        /// How many local replicas to run.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        #[arg(long, default_value = "sync-all")]
        commit: CommitMode,
        #[command(flatten)]
        tls: node::TlsArgs,
        /// Where `up` keeps the CA and certificates it makes for its nodes' mutual TLS and
        /// for NBD's (default: DIR/tls); existing ones are reused.
        #[arg(long, value_name = "DIR")]
        peer_tls_dir: Option<PathBuf>,
    },
    /// Make the certificates TLS needs: a CA (`init`), then node, server and client
    /// certificates signed by it (`issue`).
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Look at a volume run by `blockrep node` in etcd (`list`), or move its leadership
    /// (`switchover --to NODE`, `failover --to NODE [--force]`), like patronictl.
    Ctl(control::ctl::CtlArgs),
    /// Run one node of an etcd-led volume: primary while it holds the leader key, replica of
    /// the leader otherwise; failover is automatic.
    Node(Box<control::node_args::NodeArgs>),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal who has not asked for none (NO_COLOR):
    // journald and log files get plain text.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockrep: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, matches: &clap::ArgMatches) -> Result<()> {
    let sub = |name: &str| {
        matches
            .subcommand_matches(name)
            .cloned()
            .unwrap_or_default()
    };
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
        Command::Serve {
            mut dir,
            config,
            mut serve,
        } => {
            if let Some(path) = &config {
                let file = config::ConfigFile::load(path)?;
                config::apply_serve(&sub("serve"), &file, &mut dir, &mut serve)?;
            }
            let dir = dir.context("no store: give DIR, or `dir` in the config file")?;
            node::serve(&dir, &serve)
        }
        Command::Replica {
            mut dir,
            config,
            mut listen,
            mut size,
            mut io_engine,
            mut observe,
            mut peer,
        } => {
            if let Some(path) = &config {
                let file = config::ConfigFile::load(path)?;
                config::apply_replica(
                    &sub("replica"),
                    &file,
                    &mut dir,
                    &mut listen,
                    &mut size,
                    &mut io_engine,
                    &mut observe,
                )?;
                config::apply_peer_tls(&sub("replica"), &file, &mut peer)?;
            }
            let dir = dir.context("no store: give DIR, or `dir` in the config file")?;
            let listen =
                listen.context("no --listen address (flag or `listen` in the config file)")?;
            node::replica(&dir, &listen, size, io_engine, &observe, &peer)
        }
        Command::Status { admin, json, watch } => status::show(&admin, json, watch),
        Command::SetAddress {
            replica,
            admin,
            admin_token_file,
        } => status::set_address(&admin, &replica, admin_token_file.as_deref()),
        Command::Up {
            dir,
            size,
            nbd,
            replicas,
            commit,
            tls,
            peer_tls_dir,
        } => node::up(&dir, size, nbd, replicas, commit, (tls, peer_tls_dir)),
        Command::Inspect { dir, json } => offline::inspect(&dir, json),
        Command::Export {
            dir,
            file,
            io_engine,
        } => offline::export(&dir, &file, io_engine),
        Command::Certs { command } => certs::run(command),
        Command::Ctl(args) => control::ctl::run(args),
        Command::Node(args) => control::node_args::run(*args),
    }
}
