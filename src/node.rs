//! Running nodes: a primary (`serve`), a replica (`replica`), and the local cluster (`up`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blockrep_frontend::{Exports, ListenAddr, Server, Tls, TlsMode};
use blockrep_replication::core::{CommitMode, ReplicaId};
use blockrep_replication::driver::tls::PeerTls;
use blockrep_replication::driver::{self, primary::PrimaryHandle};
use blockrep_storage::{CreateOptions, Epoch, IoMode, OpenOptions, Store, VolumeId};
use tokio_util::sync::CancellationToken;

use crate::exposure::{warn_exposed, Port};
use crate::observe::{NodeKind, StatusSource, VolumeMetrics};
pub use crate::peer_tls::PeerTlsArgs;
use crate::peer_tls::{count_rejects, UpCertificates};
use crate::primary::{begin_serving, promote, start_replication, Promote, ReplicationPlan};
use crate::status::AdminToken;
use crate::support::{human, runtime, DEFAULT_NBD};
use crate::volume::StoreVolume;

pub const DEFAULT_PRIMARY_METRICS: &str = "127.0.0.1:9810";
pub const DEFAULT_REPLICA_METRICS: &str = "127.0.0.1:9811";

#[derive(clap::Args, Clone, Default)]
pub struct ObserveArgs {
    /// Where to serve /metrics, /healthz, /readyz and /v1/status (default 127.0.0.1:9810 for
    /// a primary, :9811 for a replica; a busy default falls back to a free port). `off`
    /// serves no endpoint and records nothing per request (bench/metrics-overhead.sh measures
    /// what recording costs against it).
    #[arg(long)]
    pub metrics: Option<String>,
    /// The volume's name in metrics and status (default: its UUID, the same on every copy).
    #[arg(long)]
    pub volume_name: Option<String>,
    /// A file holding the bearer token (at least 16 characters) that the admin endpoint's
    /// PUT /v1/replicas/NAME/address (`blockrep set-address`) must carry; without it that PUT
    /// is disabled. The GETs stay open.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
}

impl ObserveArgs {
    fn off(&self) -> bool {
        self.metrics.as_deref() == Some("off")
    }

    /// The token of `--admin-token-file`, read and checked (a bad file refuses the start).
    pub fn admin_token(&self) -> Result<Option<AdminToken>> {
        Ok(self
            .admin_token_file
            .as_deref()
            .map(AdminToken::load)
            .transpose()?)
    }
}

/// Starts the admin endpoint (none with `--metrics off`). An explicitly requested address
/// must be free; the default falls back to any free port (printed), so several nodes can
/// share a host.
pub(crate) async fn start_admin(
    args: &ObserveArgs,
    default: &str,
    admin: blockrep_metrics::Admin,
    shutdown: CancellationToken,
) -> Result<Option<std::net::SocketAddr>> {
    if args.off() {
        return Ok(None);
    }
    let addr = match &args.metrics {
        Some(addr) => blockrep_metrics::serve(addr, admin, shutdown).await?,
        None => match blockrep_metrics::serve(default, admin.clone(), shutdown.clone()).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!("{e}; serving metrics on a free port instead");
                blockrep_metrics::serve("127.0.0.1:0", admin, shutdown).await?
            }
        },
    };
    Ok(Some(addr))
}

pub(crate) fn volume_metrics(store: &Store, args: &ObserveArgs) -> Result<Arc<VolumeMetrics>> {
    let metrics = Arc::new(blockrep_metrics::Metrics::new().context("metrics")?);
    let name = args
        .volume_name
        .clone()
        .unwrap_or_else(|| store.volume_id().to_string());
    let vm = VolumeMetrics::new(metrics, &name);
    if !args.off() {
        store.set_observer(vm.clone());
    }
    Ok(vm)
}

/// NBD over TLS, with nbdkit's flags (so libnbd's and qemu's `nbds://` clients work as is).
#[derive(clap::Args, Clone, Default)]
pub struct TlsArgs {
    /// NBD over TLS: off, on (clients choose) or require (plaintext clients are refused
    /// with NBD_REP_ERR_TLS_REQD).
    #[arg(long, default_value = "off")]
    pub tls: TlsMode,
    /// The directory with ca-cert.pem, server-cert.pem and server-key.pem (and optionally
    /// ca-crl.pem) for --tls on|require.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Clients must present a certificate signed by ca-cert.pem.
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// Not supported (TLS-PSK); only here to say so and point at X.509.
    #[arg(long, value_name = "FILE", hide = true)]
    pub tls_psk: Option<PathBuf>,
}

impl TlsArgs {
    /// The server's TLS, with a one-line reason when the flags or the files are wrong.
    pub fn load(&self) -> Result<Tls> {
        if self.tls_psk.is_some() {
            bail!(
                "--tls-psk: TLS-PSK is not supported (rustls has no PSK); X.509 is: use \
                 --tls-certificates DIR with ca-cert.pem, server-cert.pem and server-key.pem"
            );
        }
        let Some(dir) = &self.tls_certificates else {
            if self.tls != TlsMode::Off {
                bail!(
                    "--tls {} needs --tls-certificates DIR (holding ca-cert.pem, \
                     server-cert.pem and server-key.pem)",
                    self.tls
                );
            }
            if self.tls_verify_peer {
                bail!("--tls-verify-peer needs --tls on or --tls require");
            }
            return Ok(Tls::off());
        };
        if self.tls == TlsMode::Off {
            bail!(
                "--tls-certificates {} is given but --tls is off; add --tls require (or on)",
                dir.display()
            );
        }
        Tls::load(self.tls, dir, self.tls_verify_peer).context("--tls-certificates")
    }

    /// The URI scheme clients use (`nbds` when they must use TLS).
    fn scheme(&self) -> &'static str {
        if self.tls == TlsMode::Require {
            "nbds"
        } else {
            "nbd"
        }
    }
}

#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    /// Where to serve NBD: host:port or unix:/path (repeatable).
    #[arg(long = "nbd", default_value = DEFAULT_NBD)]
    pub nbd: Vec<ListenAddr>,
    /// Export name (clients may also use the empty default name).
    #[arg(long, default_value = "blockrep")]
    pub export: String,
    /// I/O backend: auto (io_uring when available), uring, plain.
    #[arg(long, default_value = "auto")]
    pub io_engine: IoMode,
    /// Serve at this epoch (default: one above every epoch seen).
    #[arg(long)]
    pub epoch: Option<u64>,
    /// Checkpoint interval in milliseconds when the WAL is not filling up.
    #[arg(long, default_value_t = 1000)]
    pub flush_interval_ms: u64,
    /// A replica of this volume, NAME=HOST:PORT (repeatable). NAME is its stable identity.
    #[arg(long = "replica", value_parser = parse_replica)]
    pub replicas: Vec<(ReplicaId, String)>,
    /// What FLUSH waits for: sync-all, sync-quorum or best-effort (default: sync-all with
    /// replicas, best-effort without).
    #[arg(long)]
    pub commit: Option<CommitMode>,
    /// A FLUSH that cannot meet the commit mode fails (EIO) after this long.
    #[arg(long, default_value_t = 5000)]
    pub barrier_timeout_ms: u64,
    /// Promote this store even if it may lack acknowledged data (logged loudly).
    #[arg(long)]
    pub force: bool,
    /// Limit rebuild traffic to this many bytes per second (0: no limit).
    #[arg(long, value_parser = crate::support::parse_size, default_value = "0")]
    pub rebuild_rate: u64,
    #[command(flatten)]
    pub observe: ObserveArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub peer: PeerTlsArgs,
    /// The `tls-certificates=` directory the banner tells clients to use (`up`'s own).
    #[arg(skip)]
    pub client_certificates: Option<PathBuf>,
    /// At most this much NBD request payload and reply data in memory across all clients
    /// (each client also keeps to 64 MiB of its own); a client past it waits (TCP
    /// back-pressure), it gets no error.
    #[arg(long, value_parser = crate::support::parse_size, default_value = "256MiB")]
    pub nbd_memory_budget: u64,
    /// Close an NBD connection that has nothing in flight and has sent no request for this
    /// many seconds (default, or 0: never).
    #[arg(long, value_name = "SECS")]
    pub nbd_idle_timeout: Option<u64>,
}

impl ServeArgs {
    /// Refuses NBD bounds no server could work with.
    fn check_nbd_bounds(&self) -> Result<()> {
        if self.nbd_memory_budget < 1 << 20 {
            bail!(
                "--nbd-memory-budget {} is too small: give at least 1MiB (default 256MiB)",
                self.nbd_memory_budget
            );
        }
        Ok(())
    }

    /// The NBD server's bounds from `--nbd-memory-budget` and `--nbd-idle-timeout`.
    fn bound(&self, server: Server) -> Server {
        let idle = self
            .nbd_idle_timeout
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        server
            .memory_budget(self.nbd_memory_budget)
            .idle_timeout(idle)
    }
}

pub(crate) fn parse_replica(s: &str) -> Result<(ReplicaId, String), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=HOST:PORT (for example r1=10.0.0.2:10900)"))?;
    if name.is_empty() || !addr.contains(':') {
        return Err(format!("{s:?} is not NAME=HOST:PORT"));
    }
    Ok((ReplicaId(name.to_string()), addr.to_string()))
}

/// Opens a store to serve from. A primary with replicas passes `keep_retained_wal` (see
/// `OpenOptions::keep_retained_wal`).
pub(crate) fn open_store(
    dir: &Path,
    io_mode: IoMode,
    flush_interval_ms: u64,
    keep_retained_wal: bool,
) -> Result<Arc<Store>> {
    Ok(Arc::new(Store::open(
        dir,
        &OpenOptions {
            io_mode,
            flush_interval: Duration::from_millis(flush_interval_ms.max(1)),
            read_only: false,
            keep_retained_wal,
            place_large_writes: true,
        },
    )?))
}

/// `blockrep serve`.
pub fn serve(dir: &Path, args: &ServeArgs) -> Result<()> {
    // Bad TLS flags or files, or a bad token file, are refused before the store is touched.
    let tls = args.tls.load()?;
    let token = args.observe.admin_token()?;
    args.check_nbd_bounds()?;
    let peer = args.peer.load()?;
    let replicated = !args.replicas.is_empty();
    let store = open_store(dir, args.io_engine, args.flush_interval_ms, replicated)?;
    let rt = runtime()?;
    let shutdown = CancellationToken::new();
    let signals = rt.block_on(async { install_signal_handlers(shutdown.clone()) })?;
    let result = rt.block_on(serve_primary(
        dir,
        store.clone(),
        args,
        (tls, token, peer),
        shutdown,
    ));
    signals.abort();
    drop(rt);
    tracing::info!("shutting down: making acknowledged writes durable");
    store.close().context("closing the store")?;
    result
}

/// Everything a primary does once its store is open, until `shutdown`. The NBD TLS, the
/// admin token and the peers' TLS were all loaded before the store was opened.
async fn serve_primary(
    dir: &Path,
    store: Arc<Store>,
    args: &ServeArgs,
    (tls, token, peer): (Tls, Option<AdminToken>, Option<PeerTls>),
    shutdown: CancellationToken,
) -> Result<()> {
    let peer_tls = peer.is_some();
    let mode = args.commit.unwrap_or(if args.replicas.is_empty() {
        CommitMode::BestEffort
    } else {
        CommitMode::SyncAll
    });
    mode.validate(args.replicas.len()).map_err(|e| anyhow!(e))?;
    let epoch = choose_epoch(dir, &store, args, mode, peer.clone()).await?;
    let server = args.bound(Server::bind(&args.nbd).await?.tls(tls));
    // Only a start that will serve begins a new epoch; it is durable before anything else.
    let epoch = begin_serving(&store, epoch, mode).await?;
    let metrics = volume_metrics(&store, &args.observe)?;
    if let Some(peer) = &peer {
        count_rejects(peer, &metrics);
    }
    let primary = if args.replicas.is_empty() {
        None
    } else {
        let plan = args.replication_plan();
        Some(start_replication(&store, &plan, mode, epoch, peer, shutdown.clone()).await?)
    };
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let source = Arc::new(StatusSource::new(
        store.clone(),
        metrics.clone(),
        NodeKind::Primary {
            mode,
            replication: primary.clone(),
        },
    ));
    let set_address = primary.clone().map(|p| set_address_handler(p, args));
    let status_source = source.clone();
    let admin_addr = start_admin(
        &args.observe,
        DEFAULT_PRIMARY_METRICS,
        blockrep_metrics::Admin {
            metrics: metrics.metrics.clone(),
            status: Arc::new(move || status_source.report()),
            ready: ready.clone(),
            set_replica_address: set_address,
            admin_token: token.as_ref().map(AdminToken::secret),
            leading: None,
        },
        shutdown.clone(),
    )
    .await?;
    warn_primary_exposure(&server, args, admin_addr, (token.is_some(), peer_tls));
    print_banner(dir, &store, args, mode, epoch, &server, admin_addr);
    let mut exports = Exports::new();
    exports.add(
        args.export.clone(),
        Arc::new(StoreVolume::new(
            store.clone(),
            primary,
            metrics.clone(),
            mode.name(),
        )),
    );
    ready.store(true, std::sync::atomic::Ordering::Release);
    crate::systemd::ready(&format!("serving {} at epoch {epoch}", dir.display()));
    crate::systemd::spawn_watchdog();
    if args.observe.off() {
        server.run(exports, shutdown).await?;
    } else {
        server.observe(metrics).run(exports, shutdown).await?;
    }
    crate::systemd::stopping();
    Ok(())
}

/// One warning for each of a primary's ports (NBD, admin) and replica connections that other
/// hosts reach without protection.
fn warn_primary_exposure(
    server: &Server,
    args: &ServeArgs,
    admin: Option<std::net::SocketAddr>,
    (token, peer_tls): (bool, bool),
) {
    let nbd: Vec<String> = server
        .local_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    warn_exposed(
        Port::Nbd {
            tls: args.tls.tls != TlsMode::Off,
        },
        &nbd,
    );
    if let Some(a) = admin {
        warn_exposed(Port::Admin { token }, &[a.to_string()]);
    }
    for (id, addr) in &args.replicas {
        let port = Port::ReplicaPeer {
            name: &id.0,
            peer_tls,
        };
        warn_exposed(port, std::slice::from_ref(addr));
    }
}

/// What the admin endpoint calls to point a replica at a new address.
type SetAddress = dyn Fn(&str, &str) -> Result<(), String> + Send + Sync;

/// The admin endpoint's `set-address` for the configured replicas.
fn set_address_handler(primary: PrimaryHandle, args: &ServeArgs) -> Arc<SetAddress> {
    let known: Vec<String> = args.replicas.iter().map(|(id, _)| id.0.clone()).collect();
    Arc::new(move |name: &str, addr: &str| {
        if !known.iter().any(|k| k == name) {
            return Err(format!(
                "no replica named {name:?} (known: {})",
                known.join(", ")
            ));
        }
        primary.set_address(ReplicaId(name.to_string()), addr.to_string());
        Ok(())
    })
}

/// What a serving primary prints on stdout: where it serves, and how to look at it.
fn print_banner(
    dir: &Path,
    store: &Store,
    args: &ServeArgs,
    mode: CommitMode,
    epoch: Epoch,
    server: &Server,
    admin_addr: Option<std::net::SocketAddr>,
) {
    let info = store.info();
    let scheme = args.tls.scheme();
    for addr in server.local_addrs() {
        let uri = match &addr {
            ListenAddr::Tcp(a) => format!("{scheme}://{a}/{}", args.export),
            ListenAddr::Unix(p) => {
                format!("{scheme}+unix:///{}?socket={}", args.export, p.display())
            }
        };
        println!(
            "blockrep: serving {} ({}, epoch {epoch}, {} with {} replica(s), I/O {}) at {uri}",
            dir.display(),
            human(info.volume_size),
            mode,
            args.replicas.len(),
            store.io_engine()
        );
    }
    match admin_addr {
        Some(a) => {
            println!("  metrics and status: http://{a}/metrics  (blockrep status --admin {a})")
        }
        None => println!("  metrics and status: off (--metrics off)"),
    }
    let addrs = server.local_addrs();
    match (addrs.first(), args.tls.tls, &args.client_certificates) {
        (Some(ListenAddr::Tcp(a)), TlsMode::Off, _) => {
            println!("  try: nbdinfo nbd://{a}   or   qemu-io -f raw nbd://{a} -c 'read 0 4k'")
        }
        (Some(ListenAddr::Tcp(a)), _, Some(client)) => println!(
            "  try: nbdinfo 'nbds://{a}/{}?tls-certificates={}'",
            args.export,
            client.display()
        ),
        (Some(ListenAddr::Tcp(a)), _, None) => println!(
            "  try: nbdinfo 'nbds://{a}/{}?tls-certificates=DIR' (DIR: the client's ca-cert.pem, \
             and client-cert.pem + client-key.pem with --tls-verify-peer)",
            args.export
        ),
        _ => {}
    }
}

/// The epoch to serve at. A store that last served as a replica is being promoted: it must
/// be able to recover the whole committed prefix, which its replica peers are asked about.
async fn choose_epoch(
    dir: &Path,
    store: &Store,
    args: &ServeArgs,
    mode: CommitMode,
    tls: Option<PeerTls>,
) -> Result<Option<Epoch>> {
    let asked = Promote {
        candidate: dir.display().to_string(),
        replicas: &args.replicas,
        copies: 0,
        mode,
        epoch: args.epoch.map(Epoch),
        force: args.force,
        vouchers: &[],
        elected: false,
    };
    promote(store, &asked, tls).await
}

impl ServeArgs {
    fn replication_plan(&self) -> ReplicationPlan<'_> {
        ReplicationPlan {
            replicas: &self.replicas,
            barrier_timeout_ms: self.barrier_timeout_ms,
            rebuild_rate: self.rebuild_rate,
            confirm_interval_ms: 0,
        }
    }
}

/// Installs SIGTERM and SIGINT handlers that cancel `shutdown`; must run inside the runtime,
/// before anything is announced, so a SIGTERM sent as soon as a node says it is ready is a
/// clean stop.
pub(crate) fn install_signal_handlers(
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
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

/// `blockrep replica`.
pub fn replica(
    dir: &Path,
    listen: &str,
    size: Option<u64>,
    io_mode: IoMode,
    observe: &ObserveArgs,
    peer: &PeerTlsArgs,
) -> Result<()> {
    let token = observe.admin_token()?;
    let peer = peer.load()?;
    if !dir.exists() {
        let Some(size) = size else {
            bail!(
                "{}: no store here; create one with `blockrep create {0} --size SIZE` or pass \
                 --size (a blank store joins the volume of the first primary that connects)",
                dir.display()
            );
        };
        Store::create(
            dir,
            &CreateOptions {
                size,
                wal_capacity: CreateOptions::DEFAULT_WAL_CAPACITY,
                volume_id: None,
            },
        )?;
    }
    let store = open_store(dir, io_mode, 1000, false)?;
    let rt = replica_runtime()?;
    let shutdown = CancellationToken::new();
    let result = rt.block_on(async {
        let signals = install_signal_handlers(shutdown.clone())?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let metrics = volume_metrics(&store, observe)?;
        if let Some(peer) = &peer {
            count_rejects(peer, &metrics);
        }
        let (status_tx, status_rx) = tokio::sync::watch::channel(Default::default());
        let source = Arc::new(StatusSource::new(
            store.clone(),
            metrics.clone(),
            NodeKind::Replica { status: status_rx },
        ));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let admin_addr = start_admin(
            observe,
            DEFAULT_REPLICA_METRICS,
            blockrep_metrics::Admin {
                metrics: metrics.metrics.clone(),
                status: Arc::new(move || source.report()),
                ready,
                set_replica_address: None,
                admin_token: token.as_ref().map(AdminToken::secret),
                leading: None,
            },
            shutdown.clone(),
        )
        .await?;
        let listen_addr = listener.local_addr().map(|a| a.to_string());
        let peer_tls = peer.is_some();
        warn_exposed(Port::Replication { peer_tls }, &[listen.to_string()]);
        if let Some(a) = admin_addr {
            let token = token.is_some();
            warn_exposed(Port::Admin { token }, &[a.to_string()]);
        }
        let sb = store.superblock();
        println!(
            "blockrep: replica {} (volume {}, epoch {}, head {}) listening on {}, metrics {}",
            dir.display(),
            sb.volume_id,
            sb.epoch,
            store.head(),
            listen_addr.unwrap_or_default(),
            admin_addr.map_or("off".to_string(), |a| format!("on http://{a}"))
        );
        crate::systemd::ready(&format!("replica of {} listening", sb.volume_id));
        crate::systemd::spawn_watchdog();
        let r =
            driver::replica::serve(store.clone(), listener, shutdown, Some(status_tx), peer).await;
        crate::systemd::stopping();
        signals.abort();
        r.map_err(anyhow::Error::from)
    });
    drop(rt);
    store.close().context("closing the store")?;
    result
}

/// `blockrep up`: a primary and `replicas` local replicas in one process.
pub fn up(
    dir: &Path,
    size: u64,
    nbd: Vec<ListenAddr>,
    replicas: usize,
    commit: CommitMode,
    (mut tls, pki_dir): (TlsArgs, Option<PathBuf>),
) -> Result<()> {
    let pki = UpCertificates::at(pki_dir.unwrap_or_else(|| dir.join("tls")));
    // `--tls on|require` alone serves NBD with the certificate `up` makes for itself.
    let generated = tls.tls != TlsMode::Off && tls.tls_certificates.is_none();
    if generated {
        tls.tls_certificates = Some(pki.server());
    }
    // Refused before anything is created, like every other bad flag (the generated
    // certificates are loaded once they exist).
    let checked = if generated && tls.tls_psk.is_none() {
        None
    } else {
        Some(tls.load()?)
    };
    // Durably: a power loss must not take the directory holding the stores away.
    blockrep_storage::create_dir_all_durable(dir).with_context(|| format!("{}", dir.display()))?;
    let names: Vec<String> = (1..=replicas).map(|i| format!("r{i}")).collect();
    let (primary_tls, replica_tls) = pki.ensure_and_load(&names)?;
    let nbd_tls = match checked {
        Some(t) => t,
        None => tls.load()?,
    };
    let primary_dir = dir.join("primary");
    let volume_id = if primary_dir.exists() {
        Store::read_superblock(&primary_dir)?.volume_id
    } else {
        let id = create(&primary_dir, size, None)?;
        println!(
            "created volume {id} ({}) in {}",
            human(size),
            primary_dir.display()
        );
        id
    };
    let size = Store::read_superblock(&primary_dir)?.volume_size;
    let mut replica_stores = Vec::new();
    for i in 1..=replicas {
        let d = dir.join(format!("replica-{i}"));
        if !d.exists() {
            create(&d, size, Some(volume_id))?;
        }
        replica_stores.push((format!("r{i}"), open_store(&d, IoMode::Auto, 1000, false)?));
    }
    let store = open_store(&primary_dir, IoMode::Auto, 1000, replicas > 0)?;
    let rt = runtime()?;
    let shutdown = CancellationToken::new();
    let result = rt.block_on(async {
        let signals = install_signal_handlers(shutdown.clone())?;
        let mut addrs = Vec::new();
        for ((name, s), peer) in replica_stores.iter().zip(replica_tls) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?.to_string();
            tokio::spawn(driver::replica::serve(
                s.clone(),
                listener,
                shutdown.clone(),
                None,
                Some(peer),
            ));
            addrs.push((ReplicaId(name.clone()), addr));
        }
        let args = ServeArgs {
            nbd,
            export: "blockrep".into(),
            io_engine: IoMode::Auto,
            epoch: None,
            flush_interval_ms: 1000,
            replicas: addrs,
            commit: Some(commit),
            barrier_timeout_ms: 5000,
            force: false,
            rebuild_rate: 0,
            observe: ObserveArgs::default(),
            tls,
            nbd_memory_budget: blockrep_frontend::DEFAULT_MEMORY_BUDGET,
            nbd_idle_timeout: None,
            peer: PeerTlsArgs::default(),
            client_certificates: generated.then(|| pki.client()),
        };
        let r = serve_primary(
            &primary_dir,
            store.clone(),
            &args,
            (nbd_tls, None, Some(primary_tls)),
            shutdown.clone(),
        )
        .await;
        shutdown.cancel();
        signals.abort();
        r
    });
    drop(rt);
    tracing::info!("shutting down: making acknowledged writes durable");
    store.close().context("closing the primary store")?;
    for (_, s) in replica_stores {
        s.close().context("closing a replica store")?;
    }
    result
}

pub(crate) fn create(dir: &Path, size: u64, volume_id: Option<VolumeId>) -> Result<VolumeId> {
    Ok(Store::create(
        dir,
        &CreateOptions {
            size,
            wal_capacity: CreateOptions::DEFAULT_WAL_CAPACITY,
            volume_id,
        },
    )?)
}

/// A replica's work is one event loop (its protocol core) and its store's own threads, so
/// one runtime thread serves it: frames, appends and acknowledgements then pass between its
/// tasks without waking a second runtime thread each time.
pub(crate) fn replica_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
