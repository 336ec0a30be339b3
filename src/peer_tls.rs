//! The binary's side of mutual TLS between nodes: the `--peer-tls-dir`/`--name` flags, the
//! reject counter fed from the replication driver, the warning a node running unauthenticated
//! replication off loopback logs at start, and the certificates `blockrep up` makes for itself.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use blockrep_replication::driver::tls::{PeerTls, RejectReason};

use crate::certs::{self, Kind, Leaf};
use crate::observe::VolumeMetrics;

/// Mutual TLS between nodes.
#[derive(clap::Args, Clone, Default)]
pub struct PeerTlsArgs {
    /// Replication over mutual TLS only: the directory with ca-cert.pem, node-cert.pem and
    /// node-key.pem (what `blockrep certs issue CA --node NAME --out DIR` writes). Peers must
    /// present a certificate from that CA; a replica dialed as NAME=HOST:PORT must present NAME.
    #[arg(long, value_name = "DIR")]
    pub peer_tls_dir: Option<PathBuf>,
    /// This node's name, the one its node certificate was issued for (with --peer-tls-dir).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

impl PeerTlsArgs {
    /// The node's peer TLS (`None` without a directory), refusing a directory that is
    /// incomplete or whose certificate does not carry `--name`.
    pub fn load(&self) -> Result<Option<PeerTls>> {
        let Some(dir) = &self.peer_tls_dir else {
            if let Some(name) = &self.name {
                bail!("--name {name} is given but --peer-tls-dir is not (the name is the one in its node certificate)");
            }
            return Ok(None);
        };
        let Some(name) = &self.name else {
            bail!(
                "--peer-tls-dir {} needs --name NAME: the name its node certificate was issued for",
                dir.display()
            );
        };
        PeerTls::load(dir, name).map(Some).context("--peer-tls-dir")
    }
}

/// Counts `tls`'s refusals in `blockrep_peer_rejects_total`, every reason present from zero.
pub fn count_rejects(tls: &PeerTls, metrics: &VolumeMetrics) {
    let counter = metrics.metrics.peer_rejects.clone();
    let volume = metrics.volume.clone();
    for reason in RejectReason::ALL {
        counter.with_label_values(&[volume.as_str(), reason.as_str()]);
    }
    tls.rejects()
        .set_observer(std::sync::Arc::new(move |reason| {
            counter
                .with_label_values(&[volume.as_str(), reason.as_str()])
                .inc()
        }));
}

/// The certificates `blockrep up` runs with (under `DIR/tls` unless told otherwise).
pub struct UpCertificates {
    /// Each node's `--peer-tls-dir`: `primary`, `r1`, `r2`...
    root: PathBuf,
}

impl UpCertificates {
    pub fn at(root: PathBuf) -> UpCertificates {
        UpCertificates { root }
    }

    /// The node directory of `name`.
    pub fn node(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// NBD's `--tls-certificates` directory.
    pub fn server(&self) -> PathBuf {
        self.root.join("server")
    }

    /// What an `nbds://` client passes as `tls-certificates=`.
    pub fn client(&self) -> PathBuf {
        self.root.join("client")
    }

    /// Makes the CA and every missing certificate (a node one for `primary` and each of
    /// `replicas`, a server and a client one); existing ones are kept.
    pub fn ensure(&self, replicas: &[String]) -> Result<()> {
        let ca = self.root.join("ca");
        if !certs::has_ca(&ca) {
            certs::init_ca(&ca, false)?;
            // Logged, not printed: stdout's first line stays the volume's creation.
            tracing::info!("created a CA for this cluster's TLS in {}", ca.display());
        }
        let mut wanted: Vec<(Kind, String, PathBuf)> = std::iter::once("primary".to_owned())
            .chain(replicas.iter().cloned())
            .map(|n| (Kind::Node, n.clone(), self.node(&n)))
            .collect();
        wanted.push((Kind::Server, "blockrep".into(), self.server()));
        wanted.push((Kind::Client, "client".into(), self.client()));
        for (kind, name, out) in wanted {
            if out.join(kind.cert_file()).exists() && out.join(kind.key_file()).exists() {
                continue;
            }
            certs::issue(&ca, &Leaf::new(kind, &name, vec![])?, &out)
                .with_context(|| format!("issuing {}'s certificate", name))?;
        }
        Ok(())
    }

    /// Makes what is missing (see [`UpCertificates::ensure`]), then loads the peer TLS of the
    /// primary and of each of `replicas`, in that order.
    pub fn ensure_and_load(&self, replicas: &[String]) -> Result<(PeerTls, Vec<PeerTls>)> {
        self.ensure(replicas)?;
        let peers = replicas
            .iter()
            .map(|n| self.load(n))
            .collect::<Result<Vec<_>>>()?;
        Ok((self.load("primary")?, peers))
    }

    /// The peer TLS of node `name`.
    pub fn load(&self, name: &str) -> Result<PeerTls> {
        PeerTls::load(&self.node(name), name)
            .with_context(|| format!("{}", self.node(name).display()))
    }
}
