//! TLS for NBD (`NBD_OPT_STARTTLS`), with nbdkit's conventions so libnbd and qemu clients
//! work unchanged: a mode (`off`, `on`, `require`), a certificate directory holding
//! `ca-cert.pem`, `server-cert.pem`, `server-key.pem` and optionally `ca-crl.pem`, and
//! `verify_peer` (clients must present a certificate the CA signed).
//!
//! This module loads the directory into a rustls acceptor (TLS 1.2 and 1.3, the `ring`
//! provider) and says what is wrong with it, naming the file, when it cannot.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockrep_pem::{PemError, Problem};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_CRL: &str = "ca-crl.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// `--tls`: whether clients may, or must, upgrade with STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// STARTTLS is refused (`NBD_REP_ERR_POLICY`).
    #[default]
    Off,
    /// Clients choose: TLS after STARTTLS, plaintext otherwise.
    On,
    /// Every option but STARTTLS and ABORT is refused before TLS (`NBD_REP_ERR_TLS_REQD`).
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!("{s:?} is not off, on or require")),
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

/// What is wrong with a certificate directory; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: missing (a TLS certificate directory holds {CA_CERT}, {SERVER_CERT} and {SERVER_KEY})", .0.display())]
    Missing(PathBuf),
    #[error("{}: cannot read it: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error("{} does not match the certificate in {}: the key was made for another certificate", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// The server side of TLS: the mode and, unless it is off, the loaded credentials.
#[derive(Clone, Default)]
pub struct Tls {
    mode: TlsMode,
    acceptor: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

impl Tls {
    /// No TLS: STARTTLS is refused.
    pub fn off() -> Tls {
        Tls::default()
    }

    /// TLS in `mode` with the certificates in `dir` (unused when the mode is off).
    pub fn load(mode: TlsMode, dir: &Path, verify_peer: bool) -> Result<Tls, TlsError> {
        if mode == TlsMode::Off {
            return Ok(Tls::off());
        }
        let config = server_config(dir, verify_peer)?;
        Ok(Tls {
            mode,
            acceptor: Some(TlsAcceptor::from(Arc::new(config))),
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The acceptor STARTTLS upgrades with; `None` when TLS is off.
    pub(crate) fn acceptor(&self) -> Option<&TlsAcceptor> {
        self.acceptor.as_ref()
    }

    /// Whether a client still in plaintext must be refused everything but STARTTLS/ABORT.
    pub(crate) fn required(&self) -> bool {
        self.mode == TlsMode::Require
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(dir: &Path, verify_peer: bool) -> Result<ServerConfig, TlsError> {
    let ca_path = dir.join(CA_CERT);
    let cert_path = dir.join(SERVER_CERT);
    let key_path = dir.join(SERVER_KEY);
    let crl_path = dir.join(CA_CRL);
    let roots = blockrep_pem::roots(&ca_path)?;
    let chain = blockrep_pem::certificates(&cert_path)?;
    let key = blockrep_pem::private_key(&key_path)?;
    let crls = blockrep_pem::revocation_lists(&crl_path)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid(dir, e))?;
    let builder = if verify_peer {
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(crls)
            .build()
            .map_err(|e| invalid(&ca_path, e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let signer = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Invalid {
            path: key_path.clone(),
            why: format!("unusable private key: {e}"),
        })?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signer);
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err(TlsError::Mismatch {
            cert: cert_path,
            key: key_path,
        });
    }
    builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&cert_path, e))
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

impl From<PemError> for TlsError {
    fn from(e: PemError) -> TlsError {
        match e.problem {
            Problem::Missing => TlsError::Missing(e.path),
            Problem::Unreadable(source) => TlsError::Unreadable {
                path: e.path,
                source,
            },
            Problem::Invalid(why) => TlsError::Invalid { path: e.path, why },
        }
    }
}
