//! `blockrep node`: its flags, and starting one node of an etcd-led volume (the store, the
//! admin endpoint, etcd) before the control loop ([`super::node_loop`]) takes over.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockrep_control::{Keys, NodeConfig, Timing};
use blockrep_frontend::ListenAddr;
use blockrep_metrics::ControlReport;
use blockrep_replication::core::CommitMode;
use blockrep_storage::{IoMode, Store};
use tokio_util::sync::CancellationToken;

use super::args::EtcdArgs;
use super::etcd::{Etcd, EtcdMetrics};
use super::gate::OnLeaseLoss;
use super::node::{NodeRuntime, NodeSettings};
use super::node_loop::{self, Loop};
use crate::exposure::{warn_exposed, Port};
use crate::node::{
    create, install_signal_handlers, open_store, start_admin, volume_metrics, ObserveArgs,
    PeerTlsArgs, TlsArgs,
};
use crate::status::AdminToken;
use crate::support::{parse_size, runtime};

pub const DEFAULT_NODE_METRICS: &str = "127.0.0.1:9812";

#[derive(clap::Args)]
pub struct NodeArgs {
    /// The node's store (created blank with --size if missing).
    pub dir: PathBuf,
    /// This node's name in the volume: its member key, and the name its node certificate
    /// was issued for with --peer-tls-dir.
    #[arg(long, value_name = "NODE")]
    pub name: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Where to serve NBD while this node leads (repeatable). Elsewhere nothing listens
    /// there, so a client that tries each node in turn lands on the primary.
    #[arg(long = "nbd", required = true)]
    pub nbd: Vec<ListenAddr>,
    /// Where the leader's replication connects while this node is a replica: host:port.
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// The replication address the other members dial (default: --listen; give it when
    /// --listen is a wildcard such as 0.0.0.0:10900).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Create a blank store of this size if DIR is missing. The first node of a new volume
    /// makes its store the volume; the others are rebuilt from the leader.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// What FLUSH waits for: sync-all, sync-quorum, or best-effort (FLUSH waits for the
    /// local disk only: a failover may lose acknowledged writes, and the new leader reports
    /// how many LSNs it may have lost).
    #[arg(long, default_value = "sync-all")]
    pub commit: CommitMode,
    /// Keep acknowledging past the lease deadline while etcd is out of reach, as long as
    /// every replica the commit mode needs keeps answering barriers at this node's epoch
    /// (sync-all and sync-quorum only). Give it to every node of the volume or to none.
    #[arg(long)]
    pub failsafe: bool,
    /// The lease TTL in seconds: how long a dead leader holds the volume. Renewals every
    /// TTL/3, each given TTL/3 to answer.
    #[arg(long = "etcd-ttl", value_name = "SECONDS", default_value_t = 15)]
    pub etcd_ttl: u64,
    /// Among candidates at the same position, the higher priority leads.
    #[arg(long, default_value_t = 0)]
    pub priority: u32,
    /// Never lead (the node still replicates).
    #[arg(long)]
    pub nofailover: bool,
    /// Past the lease deadline: `suspend` stops replying and drops the NBD connections (a
    /// kernel client requeues), `io-error` fails requests with NBD_ESHUTDOWN.
    #[arg(long, value_enum, default_value = "suspend")]
    pub on_lease_loss: OnLeaseLoss,
    /// A FLUSH that cannot meet the commit mode fails (EIO) after this long.
    #[arg(long, default_value_t = 5000)]
    pub barrier_timeout_ms: u64,
    /// Limit rebuild traffic to this many bytes per second (0: no limit).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub rebuild_rate: u64,
    #[arg(long, default_value = "auto")]
    pub io_engine: IoMode,
    #[command(flatten)]
    pub observe: ObserveArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Replication over mutual TLS only: the directory with ca-cert.pem, node-cert.pem and
    /// node-key.pem for --name (what `blockrep certs issue CA --node NAME --out DIR` writes).
    #[arg(long, value_name = "DIR")]
    pub peer_tls_dir: Option<PathBuf>,
}

impl NodeArgs {
    fn timing(&self) -> Result<Timing> {
        let ttl = self.etcd_ttl.saturating_mul(1000);
        Timing::from_ttl(ttl).map_err(|e| anyhow::anyhow!("--etcd-ttl {}: {e}", self.etcd_ttl))
    }

    fn check(&self) -> Result<()> {
        if self.failsafe && self.commit == CommitMode::BestEffort {
            bail!(
                "--failsafe needs --commit sync-all or sync-quorum: under best-effort no \
                 replica acknowledges anything that could stand in for etcd's word"
            );
        }
        if self.name.is_empty() || self.name.contains('/') {
            bail!("--name {:?}: give a non-empty name without '/'", self.name);
        }
        Ok(())
    }
}

/// `blockrep node`.
pub fn run(mut args: NodeArgs) -> Result<()> {
    args.check()?;
    let timing = args.timing()?;
    // A request may take at most the retry timeout: past it, the renewal is retried.
    let retry = Duration::from_millis(timing.retry).as_secs_f64();
    args.etcd.timeout_secs = args.etcd.timeout_secs.min(retry);
    args.etcd.validate()?;
    let keys = args.etcd.keys()?;
    let nbd_tls = args.tls.load()?;
    let token = args.observe.admin_token()?;
    let peer = PeerTlsArgs {
        peer_tls_dir: args.peer_tls_dir.clone(),
        name: args.peer_tls_dir.is_some().then(|| args.name.clone()),
    }
    .load()?;
    if !args.dir.exists() {
        let Some(size) = args.size else {
            bail!(
                "{}: no store here; pass --size to create a blank one (the first node of a new \
                 volume makes its store the volume, the others are rebuilt from the leader)",
                args.dir.display()
            );
        };
        create(&args.dir, size, None)?;
    }
    let store = open_store(&args.dir, args.io_engine, 1000, false)?;
    let rt = runtime()?;
    let result = rt.block_on(serve(
        &args,
        keys,
        timing,
        store.clone(),
        (nbd_tls, token, peer),
    ));
    drop(rt);
    tracing::info!("shutting down: making acknowledged writes durable");
    store.close().context("closing the store")?;
    result
}

async fn serve(
    args: &NodeArgs,
    keys: Keys,
    timing: Timing,
    store: Arc<Store>,
    (nbd_tls, token, peer): (
        blockrep_frontend::Tls,
        Option<AdminToken>,
        Option<blockrep_replication::driver::tls::PeerTls>,
    ),
) -> Result<()> {
    let shutdown = CancellationToken::new();
    let signals = install_signal_handlers(shutdown.clone())?;
    let mut observe = args.observe.clone();
    observe
        .volume_name
        .get_or_insert_with(|| args.etcd.volume.clone());
    let metrics = volume_metrics(&store, &observe)?;
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| args.listen.clone());
    let settings = NodeSettings {
        name: args.name.clone(),
        nbd: args.nbd.clone(),
        export: args.etcd.volume.clone(),
        listen: args.listen.clone(),
        mode: args.commit,
        barrier_timeout_ms: args.barrier_timeout_ms,
        rebuild_rate: args.rebuild_rate,
        // Often enough that an idle failsafe leader's confirmation is never older than a
        // fraction of the renew interval.
        confirm_interval_ms: if args.failsafe {
            (timing.renew / 5).max(50)
        } else {
            0
        },
        nbd_tls,
        peer_tls: peer.clone(),
        nbd_memory_budget: blockrep_frontend::DEFAULT_MEMORY_BUDGET,
    };
    let runtime = NodeRuntime::new(settings, store.clone(), metrics.clone());
    let leading = Arc::new(AtomicBool::new(false));
    let control = Arc::new(Mutex::new(ControlReport {
        node: args.name.clone(),
        role: "standby".into(),
        ..ControlReport::default()
    }));
    let admin = blockrep_metrics::Admin {
        metrics: metrics.metrics.clone(),
        status: status_report(&runtime, control.clone()),
        ready: Arc::new(AtomicBool::new(true)),
        set_replica_address: None,
        admin_token: token.as_ref().map(AdminToken::secret),
        leading: Some(leading.clone()),
    };
    let admin_addr = start_admin(&observe, DEFAULT_NODE_METRICS, admin, shutdown.clone()).await?;
    let nbd: Vec<String> = args.nbd.iter().map(ToString::to_string).collect();
    warn_node_exposure(args, &nbd, admin_addr, (token.is_some(), peer.is_some()));
    let etcd = Etcd::connect(&args.etcd)
        .await
        .context("etcd")?
        .with_metrics(EtcdMetrics {
            request_seconds: metrics.metrics.etcd_request.clone(),
            volume: metrics.volume.clone(),
        });
    let cfg = NodeConfig {
        name: args.name.clone(),
        priority: args.priority,
        nofailover: args.nofailover,
        timing,
        commit: args.commit.name().to_string(),
        failsafe: args.failsafe,
    };
    println!(
        "blockrep: node {} of volume {} ({}, lease TTL {} s), replication on {}, NBD on {} \
         while leading, metrics {}",
        args.name,
        args.etcd.volume,
        args.commit,
        args.etcd_ttl,
        advertise,
        nbd.join(", "),
        admin_addr.map_or("off".to_string(), |a| format!("on http://{a}"))
    );
    crate::systemd::ready(&format!("node {} of {}", args.name, args.etcd.volume));
    crate::systemd::spawn_watchdog();
    let node = Loop {
        etcd,
        keys,
        cfg,
        origin: Instant::now(),
        on_lease_loss: args.on_lease_loss,
        advertise,
        nbd,
        admin: admin_addr.map(|a| a.to_string()),
        metrics,
        leading,
        control,
    };
    let result = node_loop::run(node, runtime, shutdown).await;
    crate::systemd::stopping();
    signals.abort();
    result
}

/// `/v1/status`: the running role's report, with the control plane's section and role.
fn status_report(
    runtime: &NodeRuntime,
    control: Arc<Mutex<ControlReport>>,
) -> Arc<dyn Fn() -> blockrep_metrics::StatusReport + Send + Sync> {
    let slot = runtime.status_slot();
    Arc::new(move || {
        let source = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut r = source.report();
        let c = control.lock().unwrap_or_else(|p| p.into_inner()).clone();
        r.role = c.role.clone();
        r.control = Some(c);
        r
    })
}

/// One warning for each of the node's ports that other hosts reach without protection.
fn warn_node_exposure(
    args: &NodeArgs,
    nbd: &[String],
    admin: Option<std::net::SocketAddr>,
    (token, peer_tls): (bool, bool),
) {
    let tls = args.tls.tls != blockrep_frontend::TlsMode::Off;
    warn_exposed(Port::Nbd { tls }, nbd);
    let listen = std::slice::from_ref(&args.listen);
    warn_exposed(Port::Replication { peer_tls }, listen);
    if let Some(a) = admin {
        warn_exposed(Port::Admin { token }, &[a.to_string()]);
    }
}
