//! blockrep-pem: the PEM files blockrep's TLS reads, turned into rustls types.
//!
//! It owns reading one file and parsing what it holds: certificates (a chain, or a CA
//! bundle), a private key (PKCS#8, PKCS#1 RSA or SEC1 EC, as `blockrep certs`, certtool and
//! openssl write them) and certificate revocation lists, with an error that names the file.
//! It must never build a TLS configuration, open a socket, or decide which files a directory
//! holds: the NBD server (`blockrep-frontend`) and replication (`blockrep-replication`) do,
//! each for its own directory layout, and word a missing file in its own terms.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivateSec1KeyDer,
};
use rustls::RootCertStore;

mod sec1;

/// One file that could not be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct PemError {
    pub path: PathBuf,
    pub problem: Problem,
}

/// What is wrong with a PEM file.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("missing")]
    Missing,
    #[error("cannot read it: {0}")]
    Unreadable(std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

impl PemError {
    fn invalid(path: &Path, why: impl Into<String>) -> PemError {
        PemError {
            path: path.to_path_buf(),
            problem: Problem::Invalid(why.into()),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|e| PemError {
        path: path.to_path_buf(),
        problem: match e.kind() {
            std::io::ErrorKind::NotFound => Problem::Missing,
            _ => Problem::Unreadable(e),
        },
    })
}

/// Every PEM item of type `T` (`what`, for messages) in `path`; at least one.
fn items<T: PemObject>(path: &Path, what: &str) -> Result<Vec<T>, PemError> {
    let pem = read(path)?;
    let items = T::pem_slice_iter(&pem)
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| PemError::invalid(path, format!("not a PEM {what} file: {e}")))?;
    if items.is_empty() {
        return Err(PemError::invalid(path, format!("no PEM {what} in it")));
    }
    Ok(items)
}

/// Every PEM certificate in `path`; at least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    items(path, "certificate")
}

/// The CA certificates in `path`, as trust roots.
pub fn roots(path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| PemError::invalid(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The first PEM private key in `path`. A SEC1 key whose scalar certtool padded with a
/// leading zero is repaired (see `sec1`), so that GnuTLS's ECDSA keys load.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read(path)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            PemError::invalid(path, "no PEM private key in it")
        }
        e => PemError::invalid(path, format!("not a PEM private key: {e}")),
    })?;
    if let PrivateKeyDer::Sec1(sec1) = &key {
        if let Some(repaired) = sec1::strip_scalar_padding(sec1.secret_sec1_der()) {
            return Ok(PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(repaired)));
        }
    }
    Ok(key)
}

/// The certificate revocation lists in `path`, or none when it does not exist (a CRL is
/// optional wherever blockrep reads one).
pub fn revocation_lists(
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, PemError> {
    let pem = match read(path) {
        Err(PemError {
            problem: Problem::Missing,
            ..
        }) => return Ok(Vec::new()),
        other => other?,
    };
    CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::invalid(path, format!("not a PEM certificate revocation list: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn every_error_names_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("absent.pem");
        let e = certificates(&missing).unwrap_err();
        assert!(matches!(e.problem, Problem::Missing));
        assert!(
            e.to_string().starts_with(&missing.display().to_string()),
            "{e}"
        );
        let junk = file(&dir, "junk.pem", "not pem at all\n");
        let e = certificates(&junk).unwrap_err();
        assert!(
            matches!(&e.problem, Problem::Invalid(why) if why == "no PEM certificate in it"),
            "{e}"
        );
        let e = private_key(&junk).unwrap_err();
        assert!(
            matches!(&e.problem, Problem::Invalid(why) if why == "no PEM private key in it"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_revocation_list_is_none_and_a_broken_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(revocation_lists(&dir.path().join("ca-crl.pem"))
            .expect("absent is fine")
            .is_empty());
        let broken = file(
            &dir,
            "ca-crl.pem",
            "-----BEGIN X509 CRL-----\n!!!!\n-----END X509 CRL-----\n",
        );
        assert!(matches!(
            revocation_lists(&broken).unwrap_err().problem,
            Problem::Invalid(_)
        ));
    }
}
