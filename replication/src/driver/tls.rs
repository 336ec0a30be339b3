//! Mutual TLS between nodes (`--peer-tls-dir`): a directory holding `ca-cert.pem`,
//! `node-cert.pem` and `node-key.pem` (what `blockrep certs issue CA --node NAME` writes)
//! loaded into both ends of a replication connection. A replica's port admits only peers
//! whose certificate the volume's CA signed; a primary (or a promotion's probe) dialing
//! `NAME=HOST:PORT` admits only a replica whose certificate carries NAME.
//!
//! A peer refused here never gets a frame read from it: the handshake happens before the
//! connection is handed to the framing, and so before anything reaches a core. Each refusal
//! is counted by its [`RejectReason`] and logged once per peer (see [`Rejects`]).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blockrep_pem::{PemError, Problem};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

pub const CA_CERT: &str = "ca-cert.pem";
pub const NODE_CERT: &str = "node-cert.pem";
pub const NODE_KEY: &str = "node-key.pem";

/// The first byte of every TLS record a client opens with (a handshake record). A peer
/// whose first byte is anything else is speaking the plaintext protocol.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How many peers [`Rejects`] remembers having logged; past it the oldest is forgotten (and
/// would be logged again), so a flood of addresses costs a bounded amount of memory.
pub const MAX_LOGGED_PEERS: usize = 1024;

/// What is wrong with a peer TLS directory or the name given with it.
#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    /// One of the directory's files, named.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: FileProblem },
    #[error("{name:?} is not a usable node name: {why}")]
    BadName { name: String, why: String },
    #[error("{}: this certificate is not valid for the node name {name:?} (--name must be the NAME it was issued for with `blockrep certs issue CA --node NAME`)", path.display())]
    NotForName { path: PathBuf, name: String },
}

/// What is wrong with one file of a peer TLS directory.
#[derive(Debug, thiserror::Error)]
pub enum FileProblem {
    #[error("missing (a peer TLS directory holds {CA_CERT}, {NODE_CERT} and {NODE_KEY}, as `blockrep certs issue CA --node NAME --out DIR` writes them)")]
    Missing,
    #[error("cannot read it: {0}")]
    Unreadable(std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Why a peer was refused before any of its frames was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// It spoke the plaintext protocol (or anything but TLS).
    Plaintext,
    /// It presented no certificate.
    NoCertificate,
    /// Its certificate was not signed by the volume's CA.
    UnknownCa,
    /// Its certificate is valid but for another node name.
    WrongName,
    /// Its certificate is unusable (expired, wrong purpose, bad signature...).
    BadCertificate,
    /// The TLS handshake (and first frame) did not finish within the handshake timeout.
    HandshakeTimeout,
    /// Any other TLS failure.
    TlsError,
}

impl RejectReason {
    pub const ALL: [RejectReason; 7] = [
        RejectReason::Plaintext,
        RejectReason::NoCertificate,
        RejectReason::UnknownCa,
        RejectReason::WrongName,
        RejectReason::BadCertificate,
        RejectReason::HandshakeTimeout,
        RejectReason::TlsError,
    ];

    /// The `reason` label of `blockrep_peer_rejects_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Plaintext => "plaintext",
            RejectReason::NoCertificate => "no_certificate",
            RejectReason::UnknownCa => "unknown_ca",
            RejectReason::WrongName => "wrong_name",
            RejectReason::BadCertificate => "bad_certificate",
            RejectReason::HandshakeTimeout => "handshake_timeout",
            RejectReason::TlsError => "tls_error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The reason a handshake failed with `e`, from rustls' typed error when there is one.
    pub fn of_io(e: &std::io::Error) -> RejectReason {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(e) => RejectReason::of_rustls(e),
            None => RejectReason::TlsError,
        }
    }

    pub fn of_rustls(e: &rustls::Error) -> RejectReason {
        use rustls::Error;
        match e {
            Error::NoCertificatesPresented => RejectReason::NoCertificate,
            Error::InvalidCertificate(CertificateError::UnknownIssuer) => RejectReason::UnknownCa,
            Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => RejectReason::WrongName,
            Error::InvalidCertificate(_) => RejectReason::BadCertificate,
            Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
                RejectReason::Plaintext
            }
            _ => RejectReason::TlsError,
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something told of every refusal (the binary counts them in its metrics).
pub type RejectObserver = Arc<dyn Fn(RejectReason) + Send + Sync>;

/// Refused peers: counted by reason, and logged once per (peer, reason) among the last
/// [`MAX_LOGGED_PEERS`] logged, never once per connection attempt.
#[derive(Default)]
pub struct Rejects {
    counts: [AtomicU64; 7],
    logged: Mutex<RecentPeers>,
    observer: Mutex<Option<RejectObserver>>,
}

impl std::fmt::Debug for Rejects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejects").finish_non_exhaustive()
    }
}

/// A bounded set of recently logged keys, forgetting the oldest first.
#[derive(Default)]
struct RecentPeers {
    set: HashSet<(String, RejectReason)>,
    order: VecDeque<(String, RejectReason)>,
}

impl RecentPeers {
    /// Whether `key` is new (then it is remembered).
    fn insert(&mut self, key: (String, RejectReason)) -> bool {
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() >= MAX_LOGGED_PEERS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }
}

impl Rejects {
    /// Calls `observer` on every refusal from now on.
    pub fn set_observer(&self, observer: RejectObserver) {
        *self.observer.lock().unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    /// Refusals so far for `reason`.
    pub fn count(&self, reason: RejectReason) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }

    /// Counts a refusal of `peer` (an IP, or the address dialed) and logs it if this peer
    /// was not logged for this reason recently.
    pub fn reject(&self, peer: &str, reason: RejectReason, detail: &dyn std::fmt::Display) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
        let observer = self
            .observer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(observe) = observer {
            observe(reason);
        }
        let new = self
            .logged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((peer.to_owned(), reason));
        if new {
            tracing::warn!(
                %peer,
                reason = reason.as_str(),
                "refused a replication peer: {detail} (logged once per peer and reason)"
            );
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.logged.lock().unwrap().len()
    }
}

/// A node's peer TLS: its name, both ends' configurations, and its refusals.
#[derive(Clone)]
pub struct PeerTls {
    name: String,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    rejects: Arc<Rejects>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").field("name", &self.name).finish()
    }
}

/// The stream a replication connection runs over: plain TCP, or TLS on it.
pub enum PeerStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl PeerTls {
    /// Loads `dir` for the node called `name`; refuses a certificate that does not carry
    /// `name`, or that the directory's CA did not sign.
    pub fn load(dir: &Path, name: &str) -> Result<PeerTls, PeerTlsError> {
        let ca_path = dir.join(CA_CERT);
        let cert_path = dir.join(NODE_CERT);
        let key_path = dir.join(NODE_KEY);
        let roots = Arc::new(blockrep_pem::roots(&ca_path)?);
        let chain = blockrep_pem::certificates(&cert_path)?;
        let key = blockrep_pem::private_key(&key_path)?;
        check_name(&roots, &chain, name, &cert_path)?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| invalid(&ca_path, e))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| invalid(dir, e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| invalid(&key_path, e))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| invalid(dir, e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid(&key_path, e))?;
        Ok(PeerTls {
            name: name.to_owned(),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            rejects: Arc::default(),
        })
    }

    /// The node's own name (the one its certificate carries).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn rejects(&self) -> &Arc<Rejects> {
        &self.rejects
    }

    /// The replica's side: completes the handshake with `peer` by `deadline`, requiring a
    /// certificate from the CA. `None` (counted and logged) when the peer is refused.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Option<TlsStream<TcpStream>> {
        let who = peer.ip().to_string();
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Err(_) => {
                let why = "no TLS handshake within the handshake timeout";
                self.rejects
                    .reject(&who, RejectReason::HandshakeTimeout, &why);
                return None;
            }
            // Closed (or failed) before saying anything: nothing to refuse.
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) if first[0] != TLS_HANDSHAKE_RECORD => {
                let why = "it spoke plaintext, and this port requires TLS";
                self.rejects.reject(&who, RejectReason::Plaintext, &why);
                return None;
            }
            Ok(Ok(_)) => {}
        }
        match tokio::time::timeout_at(deadline, self.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Some(TlsStream::Server(tls)),
            Ok(Err(e)) => {
                self.rejects.reject(&who, RejectReason::of_io(&e), &e);
                None
            }
            Err(_) => {
                let why = "the TLS handshake did not finish within the handshake timeout";
                self.rejects
                    .reject(&who, RejectReason::HandshakeTimeout, &why);
                None
            }
        }
    }

    /// The dialing side: a handshake with the replica at `addr` that must present `name`,
    /// by `deadline`. A refusal is counted and logged, and returned for the caller to report.
    pub(crate) async fn connect(
        &self,
        stream: TcpStream,
        name: &str,
        addr: &str,
        deadline: Instant,
    ) -> Result<TlsStream<TcpStream>, DialRefused> {
        let refuse = |reason: RejectReason, detail: String| {
            self.rejects.reject(addr, reason, &detail);
            DialRefused { reason, detail }
        };
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| {
            refuse(
                RejectReason::WrongName,
                format!("{name:?} cannot be a TLS name: {e}"),
            )
        })?;
        match tokio::time::timeout_at(deadline, self.connector.connect(server_name, stream)).await {
            Ok(Ok(tls)) => Ok(TlsStream::Client(tls)),
            Ok(Err(e)) => Err(refuse(
                RejectReason::of_io(&e),
                format!("replica {name}: {e}"),
            )),
            Err(_) => Err(refuse(
                RejectReason::HandshakeTimeout,
                format!("replica {name}: the TLS handshake timed out"),
            )),
        }
    }
}

/// A dialed peer refused by TLS.
#[derive(Debug, Clone, thiserror::Error)]
#[error("refused over TLS ({reason}): {detail}")]
pub struct DialRefused {
    pub reason: RejectReason,
    pub detail: String,
}

/// Dials `addr` (within `connect_timeout`), then TLS over it when `tls` is given, expecting
/// the peer to be called `name`.
pub(crate) async fn dial(
    tls: Option<&PeerTls>,
    name: &str,
    addr: &str,
    connect_timeout: std::time::Duration,
) -> Result<PeerStream, DialError> {
    let deadline = Instant::now() + connect_timeout;
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(DialError::Connect(e)),
        Err(_) => return Err(DialError::Timeout),
    };
    let _ = stream.set_nodelay(true);
    match tls {
        None => Ok(PeerStream::Plain(stream)),
        Some(tls) => {
            // The handshake gets a full timeout of its own after the TCP connection.
            let deadline = Instant::now() + connect_timeout;
            let s = tls.connect(stream, name, addr, deadline).await?;
            Ok(PeerStream::Tls(Box::new(s)))
        }
    }
}

/// Why dialing a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Refused(#[from] DialRefused),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks that the node certificate is one the CA signed for `name`, as a peer will check.
fn check_name(
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    name: &str,
    cert_path: &Path,
) -> Result<(), PeerTlsError> {
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| PeerTlsError::BadName {
        name: name.to_owned(),
        why: e.to_string(),
    })?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| invalid(cert_path, e))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| invalid(cert_path, "no certificate in it"))?;
    match verifier.verify_server_cert(leaf, intermediates, &server_name, &[], UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(e) if RejectReason::of_rustls(&e) == RejectReason::WrongName => {
            Err(PeerTlsError::NotForName {
                path: cert_path.to_path_buf(),
                name: name.to_owned(),
            })
        }
        Err(e) => Err(invalid(
            cert_path,
            format!("not a node certificate the CA in {CA_CERT} signed: {e}"),
        )),
    }
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> PeerTlsError {
    file_error(path, FileProblem::Invalid(e.to_string()))
}

fn file_error(path: &Path, problem: FileProblem) -> PeerTlsError {
    let path = path.to_path_buf();
    PeerTlsError::File { path, problem }
}

impl From<PemError> for PeerTlsError {
    fn from(e: PemError) -> PeerTlsError {
        let problem = match e.problem {
            Problem::Missing => FileProblem::Missing,
            Problem::Unreadable(source) => FileProblem::Unreadable(source),
            Problem::Invalid(why) => FileProblem::Invalid(why),
        };
        file_error(&e.path, problem)
    }
}

#[cfg(test)]
mod tests;
