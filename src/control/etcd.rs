//! The etcd driver: carries out the control core's reads, transactions, leases and watches
//! against a real etcd (v3 gRPC, which etcd 3.4 serves) and turns every failure into a typed
//! [`EtcdError`]. It decides nothing: what to write and when is the core's.
//!
//! Every request is bounded by the `--etcd-timeout`, so an etcd that stops answering (or a
//! network that drops packets) becomes an error the caller can act on within a known time,
//! never a hang.

use std::collections::HashMap;
use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blockrep_control::{Compare, Keys, Kv, Op, Txn, View};
use etcd_client::{
    Certificate, Client, CompareOp, ConnectOptions, GetOptions, Identity, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, TlsOptions, TxnOp, WatchOptions,
};
use prometheus::HistogramVec;
use thiserror::Error;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use super::args::EtcdArgs;

/// An etcd lease, as etcd numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// Why an etcd request did not give an answer. Callers act on the variant, never the text.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// No endpoint could be reached (connection refused or reset, no route, TLS handshake
    /// failed, every member down).
    #[error("etcd is unreachable at {endpoints}: {detail}")]
    Unreachable { endpoints: String, detail: String },
    /// A request took longer than the timeout.
    #[error("etcd did not answer {op} within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// The lease expired (or was revoked): keys on it are gone.
    #[error("etcd lease {0:x} does not exist (expired or revoked)")]
    LeaseNotFound(i64),
    /// A leased put was asked for without a lease to bind it to.
    #[error("a transaction puts {0} on this node's lease, but the node holds none")]
    NoLease(String),
    /// The CA, certificate or key for TLS to etcd could not be read. (A handshake etcd
    /// refuses is `Unreachable`: to the caller it is an etcd it cannot use.)
    #[error("TLS to etcd: {path}: {detail}")]
    Tls { path: PathBuf, detail: String },
    /// etcd answered with something this driver cannot use (a key that is not UTF-8).
    #[error("etcd returned a malformed {what}")]
    Malformed { what: String },
    /// The endpoints or options were refused by the client library.
    #[error("etcd client configuration: {0}")]
    Config(String),
    /// etcd refused the request (permissions, a too-large request, ...).
    #[error("etcd refused {op}: {detail}")]
    Rejected { op: &'static str, detail: String },
}

impl EtcdError {
    /// Whether the failure says nothing about etcd's state, only that it could not be asked:
    /// the caller should retry (and count the time against its lease).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            EtcdError::Unreachable { .. } | EtcdError::Timeout { .. }
        )
    }
}

/// The latency histogram, labelled by operation, that requests are timed into.
#[derive(Clone)]
pub struct EtcdMetrics {
    pub request_seconds: HistogramVec,
    pub volume: String,
}

/// A connected etcd client, with the timeout every request runs under.
///
/// One client per endpoint, used one at a time (as Patroni does): a request goes to the
/// current endpoint, and a failure moves on to the next. A balanced channel over all of them
/// would send a share of requests to a dead member for as long as it stays dead.
#[derive(Clone)]
pub struct Etcd {
    clients: std::sync::Arc<Vec<Client>>,
    current: std::sync::Arc<AtomicUsize>,
    endpoints: String,
    timeout: Duration,
    metrics: Option<EtcdMetrics>,
    /// The open keep-alive stream of the lease this node renews (one at a time), so each
    /// renewal is a single round trip.
    keeper: std::sync::Arc<Mutex<Option<Keeper>>>,
}

struct Keeper {
    lease: LeaseId,
    sender: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// A change notification from [`Etcd::watch`]: something under the volume's directory
/// changed (or may have: after a reconnection events can have been missed), so re-read it.
#[derive(Debug)]
pub enum WatchEvent {
    /// `revision` is the last change's, or 0 after a reconnection (the read tells).
    Changed { revision: i64 },
    /// The watch broke; it is being re-established and a `Changed` follows when it is.
    Failed(EtcdError),
}

/// A running watch; dropping it stops the watch.
pub struct Watch {
    events: mpsc::Receiver<WatchEvent>,
    task: JoinHandle<()>,
}

impl Watch {
    /// The next notification; None only if the watch task ended, which it does not on its
    /// own (it reconnects).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.events.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Etcd {
    /// Connects (lazily: the first request dials) to the endpoints with TLS if asked.
    pub async fn connect(args: &EtcdArgs) -> Result<Etcd, EtcdError> {
        args.validate()
            .map_err(|e| EtcdError::Config(e.to_string()))?;
        let timeout = args
            .timeout()
            .map_err(|e| EtcdError::Config(e.to_string()))?;
        // HTTP/2 pings find a silently dead connection (a cable pulled, a peer paused) within
        // the timeout instead of the kernel's TCP timeouts.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(timeout, timeout)
            .with_keep_alive_while_idle(true);
        if args.tls() {
            options = options.with_tls(tls_options(args)?);
        }
        let endpoints = args.endpoints();
        let mut clients = Vec::with_capacity(endpoints.len());
        for endpoint in &endpoints {
            let client = Client::connect([endpoint], Some(options.clone()))
                .await
                .map_err(|e| classify("connect", endpoint, timeout, None, e))?;
            clients.push(client);
        }
        Ok(Etcd {
            clients: std::sync::Arc::new(clients),
            current: Default::default(),
            endpoints: endpoints.join(","),
            timeout,
            metrics: None,
            keeper: Default::default(),
        })
    }

    /// Times every later request into `metrics` (`blockrep_etcd_request_seconds{op}`).
    pub fn with_metrics(mut self, metrics: EtcdMetrics) -> Etcd {
        self.metrics = Some(metrics);
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The client of the endpoint requests go to now.
    fn client(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::SeqCst) % self.clients.len().max(1);
        (i, self.clients[i].clone())
    }

    /// After a failure on endpoint `i`, the next request goes to the next endpoint (unless
    /// another request has moved on already).
    fn fail_over(&self, i: usize) {
        let next = (i + 1) % self.clients.len().max(1);
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn observe(&self, op: &str, start: Instant) {
        if let Some(m) = &self.metrics {
            m.request_seconds
                .with_label_values(&[m.volume.as_str(), op])
                .observe(start.elapsed().as_secs_f64());
        }
    }

    /// Runs one request under the timeout, timed, with its error classified. An
    /// `idempotent` request that finds its endpoint unreachable is tried on the next ones
    /// within the same timeout; any other is not retried: a transaction whose answer was
    /// lost may have been applied, and only the caller can tell (by reading again).
    async fn request<T, F, Fut>(
        &self,
        op: &'static str,
        lease: Option<LeaseId>,
        idempotent: bool,
        mut call: F,
    ) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let start = Instant::now();
        let end = start + self.timeout;
        let mut tries = 0;
        let out = loop {
            tries += 1;
            let (i, client) = self.client();
            let left = end.saturating_duration_since(Instant::now());
            let err = match tokio::time::timeout(left, call(client)).await {
                Ok(Ok(v)) => break Ok(v),
                Ok(Err(e)) => classify(op, &self.endpoints, self.timeout, lease, e),
                Err(_) => EtcdError::Timeout {
                    op,
                    after: self.timeout,
                },
            };
            if err.is_unavailable() {
                self.fail_over(i);
            }
            let again = idempotent
                && matches!(err, EtcdError::Unreachable { .. })
                && tries < self.clients.len()
                && Instant::now() < end;
            if !again {
                break Err(err);
            }
        };
        self.observe(op, start);
        out
    }

    /// The whole volume directory at one revision (the revision of the response header, so
    /// a watch from `revision + 1` misses nothing).
    pub async fn read(&self, keys: &Keys) -> Result<View, EtcdError> {
        let dir = keys.dir().to_string();
        let resp = self
            .request("read", None, true, |client| {
                let dir = dir.clone();
                async move {
                    let mut kv = client.kv_client();
                    kv.get(dir, Some(GetOptions::new().with_prefix())).await
                }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| {
                let key =
                    String::from_utf8(kv.key().to_vec()).map_err(|_| EtcdError::Malformed {
                        what: format!("key (not UTF-8) under {}", keys.dir()),
                    })?;
                Ok(Kv {
                    key,
                    value: kv.value().to_vec(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                })
            })
            .collect::<Result<Vec<Kv>, EtcdError>>()?;
        Ok(View { revision, kvs })
    }

    /// Executes `txn` as one etcd transaction; leased puts go on `lease`. Ok(false) means a
    /// compare did not hold and nothing was written.
    pub async fn txn(&self, txn: &Txn, lease: Option<LeaseId>) -> Result<bool, EtcdError> {
        let compares: Vec<etcd_client::Compare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::Absent(key) => {
                    etcd_client::Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
                }
                Compare::ModRevision(key, rev) => {
                    etcd_client::Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev)
                }
                Compare::Value(key, value) => {
                    etcd_client::Compare::value(key.as_str(), CompareOp::Equal, value.clone())
                }
            })
            .collect();
        let mut ops = Vec::with_capacity(txn.success.len());
        for op in &txn.success {
            ops.push(match op {
                Op::Put { key, value, leased } => {
                    let options = match (leased, lease) {
                        (false, _) => None,
                        (true, Some(l)) => Some(PutOptions::new().with_lease(l.0)),
                        (true, None) => return Err(EtcdError::NoLease(key.clone())),
                    };
                    TxnOp::put(key.as_str(), value.clone(), options)
                }
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
            });
        }
        let request = etcd_client::Txn::new().when(compares).and_then(ops);
        let resp = self
            .request("txn", lease, false, |client| {
                let request = request.clone();
                async move { client.kv_client().txn(request).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// A new lease of (at least) `ttl`; etcd rounds to whole seconds and may raise it to its
    /// minimum, so the TTL it granted comes back and is the one to plan with.
    pub async fn grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), EtcdError> {
        let secs = i64::try_from(ttl.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        // Not retried here: the caller times its lease from its own send instant, which a
        // hidden retry would make wrong.
        let resp = self
            .request("grant", None, false, |client| async move {
                client.lease_client().grant(secs, None).await
            })
            .await?;
        Ok((LeaseId(resp.id()), secs_to_duration(resp.ttl())))
    }

    /// Ends `lease` now: every key on it is deleted (a clean shutdown hands over at once
    /// instead of after the TTL).
    /// A lease already gone counts as revoked (a retried revoke whose first answer was lost
    /// finds it so).
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        let out = self
            .request("revoke", Some(lease), true, |client| async move {
                client.lease_client().revoke(lease.0).await
            })
            .await;
        match out {
            Ok(_) | Err(EtcdError::LeaseNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let mut keeper = self.keeper.lock().await;
        if keeper.as_ref().is_some_and(|k| k.lease == lease) {
            *keeper = None;
        }
        Ok(())
    }

    /// One keep-alive round trip for `lease`; returns the TTL etcd granted.
    ///
    /// The caller must take the instant *before* calling this and count the lease from it:
    /// etcd restarts the TTL when it receives the keep-alive, which is after it was sent, so
    /// a deadline measured from the send time ends no later than etcd's own expiry, however
    /// long the request was in flight or the answer took to come back.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, EtcdError> {
        let start = Instant::now();
        let end = start + self.timeout;
        let mut slot = self.keeper.lock().await;
        let mut tries = 0;
        let out = loop {
            tries += 1;
            let (i, client) = self.client();
            let left = end.saturating_duration_since(Instant::now());
            let err = match tokio::time::timeout(left, keep_alive_once(&client, &mut slot, lease))
                .await
            {
                // etcd answers a keep-alive for an unknown lease with TTL 0.
                Ok(Ok(0)) => EtcdError::LeaseNotFound(lease.0),
                Ok(Ok(ttl)) => break Ok(secs_to_duration(ttl)),
                Ok(Err(e)) => classify("keep_alive", &self.endpoints, self.timeout, Some(lease), e),
                Err(_) => EtcdError::Timeout {
                    op: "keep_alive",
                    after: self.timeout,
                },
            };
            // The stream may be broken or out of step: open a fresh one next time.
            *slot = None;
            if err.is_unavailable() {
                self.fail_over(i);
            }
            // A keep-alive is idempotent: another endpoint may renew in time.
            let again = matches!(err, EtcdError::Unreachable { .. })
                && tries < self.clients.len()
                && Instant::now() < end;
            if !again {
                break Err(err);
            }
        };
        self.observe("keep_alive", start);
        out
    }

    /// The seconds `lease` has left, or None if it no longer exists (for `ctl list`).
    pub async fn ttl_left(&self, lease: LeaseId) -> Result<Option<Duration>, EtcdError> {
        let resp = self
            .request("ttl", Some(lease), true, |client| async move {
                client.lease_client().time_to_live(lease.0, None).await
            })
            .await?;
        Ok((resp.ttl() >= 0).then(|| secs_to_duration(resp.ttl())))
    }

    /// Must be called inside a tokio runtime (it spawns the watch's task).
    ///
    /// Watches the volume's directory from `after + 1` (the revision of the read the caller
    /// holds, so nothing between the read and the watch is missed; 0 for "from now").
    /// Each batch of events is one `Changed`; a broken watch reports `Failed`, reconnects
    /// (pausing `timeout` between failed attempts; it resumes after the last revision it
    /// saw), and reports `Changed` once it is back, because events may have been missed.
    pub fn watch(&self, keys: &Keys, after: i64) -> Watch {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(watch_loop(self.clone(), keys.dir().to_string(), after, tx));
        Watch { events: rx, task }
    }
}

/// Sends one keep-alive on the open stream for `lease` (opening it first if needed) and
/// returns the TTL of the answer.
async fn keep_alive_once(
    client: &Client,
    slot: &mut Option<Keeper>,
    lease: LeaseId,
) -> Result<i64, etcd_client::Error> {
    if slot.as_ref().is_none_or(|k| k.lease != lease) {
        // Opening the stream already sends one keep-alive and consumes its answer (and fails
        // if the lease is gone); the round trip below then reads a TTL we can report.
        let (sender, stream) = client.lease_client().keep_alive(lease.0).await?;
        *slot = Some(Keeper {
            lease,
            sender,
            stream,
        });
    }
    // A stream that broke says nothing about the lease: an I/O error (etcd unreachable),
    // never the library's LeaseKeepAliveError, which `classify` reads as the lease being
    // gone (an etcd that dies would otherwise look as if it had expired every lease).
    let broken = |what: &str| {
        etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            what.to_string(),
        ))
    };
    let Some(keeper) = slot.as_mut() else {
        return Err(broken("no keep-alive stream"));
    };
    keeper
        .sender
        .keep_alive()
        .await
        .map_err(|_| broken("the keep-alive stream is closed"))?;
    match keeper.stream.message().await? {
        Some(resp) => Ok(resp.ttl()),
        None => Err(broken("keep-alive stream closed")),
    }
}

async fn watch_loop(etcd: Etcd, dir: String, after: i64, tx: mpsc::Sender<WatchEvent>) {
    let mut from = after.saturating_add(1).max(0);
    let mut broken = false;
    loop {
        let mut options = WatchOptions::new().with_prefix();
        if from > 1 {
            options = options.with_start_revision(from);
        }
        let opened = etcd
            .request("watch", None, true, |client| {
                let (dir, options) = (dir.clone(), options.clone());
                async move { client.watch_client().watch(dir, Some(options)).await }
            })
            .await;
        let mut stream = match opened {
            Ok(stream) => {
                if broken {
                    // Events may have been missed (a compaction, or a cancel): re-read.
                    if tx.send(WatchEvent::Changed { revision: 0 }).await.is_err() {
                        return;
                    }
                }
                stream
            }
            Err(e) => {
                broken = true;
                if tx.send(WatchEvent::Failed(e)).await.is_err() {
                    return;
                }
                tokio::time::sleep(etcd.timeout).await;
                continue;
            }
        };
        let failure = loop {
            match stream.message().await {
                Ok(Some(resp)) if resp.canceled() => {
                    // Compacted past `from` (or cancelled by etcd): start again from now.
                    from = 0;
                    break EtcdError::Rejected {
                        op: "watch",
                        detail: format!(
                            "watch cancelled (compacted to {}): {}",
                            resp.compact_revision(),
                            resp.cancel_reason()
                        ),
                    };
                }
                Ok(Some(resp)) => {
                    // Resume after the last event delivered (not the header's revision,
                    // which a watch still catching up may be past).
                    let last = resp
                        .events()
                        .iter()
                        .filter_map(|e| e.kv().map(|kv| kv.mod_revision()))
                        .max();
                    if let Some(revision) = last {
                        from = revision + 1;
                        if tx.send(WatchEvent::Changed { revision }).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => {
                    break EtcdError::Unreachable {
                        endpoints: etcd.endpoints.clone(),
                        detail: "the watch stream ended".into(),
                    }
                }
                Err(e) => break classify("watch", &etcd.endpoints, etcd.timeout, None, e),
            }
        };
        let (endpoint, _) = etcd.client();
        etcd.fail_over(endpoint);
        broken = true;
        if tx.send(WatchEvent::Failed(failure)).await.is_err() {
            return;
        }
        // A stream that breaks as soon as it opens must not become a busy loop.
        tokio::time::sleep(etcd.timeout / 5).await;
    }
}

fn secs_to_duration(secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

fn read_pem(path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|e| EtcdError::Tls {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn tls_options(args: &EtcdArgs) -> Result<TlsOptions, EtcdError> {
    let mut tls = TlsOptions::new();
    if let Some(ca) = &args.cacert {
        tls = tls.ca_certificate(Certificate::from_pem(read_pem(ca)?));
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        tls = tls.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
    }
    Ok(tls)
}

/// Sorts a client-library error into what the caller can act on, by its kind and gRPC code.
fn classify(
    op: &'static str,
    endpoints: &str,
    timeout: Duration,
    lease: Option<LeaseId>,
    e: etcd_client::Error,
) -> EtcdError {
    use etcd_client::Error as E;
    let unreachable = |detail: String| EtcdError::Unreachable {
        endpoints: endpoints.to_string(),
        detail,
    };
    match e {
        E::TransportError(t) => unreachable(source_chain(&t)),
        E::IoError(io) => unreachable(io.to_string()),
        E::GRpcStatus(status) => match i32::from(status.code()) {
            // tonic reports a failed dial as Unavailable, a connection dropped under a
            // request as Cancelled, and some hyper errors as Unknown.
            // The message is often just "transport error": the cause (refused, reset, a
            // TLS alert) is in the source chain.
            grpc::UNAVAILABLE | grpc::UNKNOWN | grpc::CANCELLED => {
                unreachable(causes(status.message(), status.source()))
            }
            grpc::DEADLINE_EXCEEDED => EtcdError::Timeout { op, after: timeout },
            grpc::NOT_FOUND if lease.is_some() => {
                EtcdError::LeaseNotFound(lease.map_or(0, |l| l.0))
            }
            _ => EtcdError::Rejected {
                op,
                detail: format!("{:?}: {}", status.code(), status.message()),
            },
        },
        // Raised only when opening a keep-alive stream finds the lease gone (TTL 0).
        E::LeaseKeepAliveError(_) if lease.is_some() => {
            EtcdError::LeaseNotFound(lease.map_or(0, |l| l.0))
        }
        E::InvalidArgs(s) => EtcdError::Config(s),
        E::InvalidUri(u) => EtcdError::Config(u.to_string()),
        other => EtcdError::Rejected {
            op,
            detail: other.to_string(),
        },
    }
}

/// gRPC's status codes (the same numbers in every gRPC implementation), so errors are sorted
/// by code without naming the transport library's type.
mod grpc {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const UNAVAILABLE: i32 = 14;
}

/// The error with its causes, which is where tonic keeps "connection refused".
fn source_chain(e: &dyn std::error::Error) -> String {
    causes(&e.to_string(), e.source())
}

fn causes(head: &str, mut cause: Option<&dyn std::error::Error>) -> String {
    let mut out = head.to_string();
    while let Some(c) = cause {
        // tonic and hyper wrap one cause in layers that say the same thing.
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Lease ids by key, from a view (for `ctl list`'s TTL column).
pub fn leases_by_key(view: &View) -> HashMap<String, LeaseId> {
    view.kvs
        .iter()
        .filter(|kv| kv.lease != 0)
        .map(|kv| (kv.key.clone(), LeaseId(kv.lease)))
        .collect()
}
