//! `blockrep certs`: a small certificate authority for one deployment, so TLS needs no PKI
//! course. It owns the CA directory's layout (`ca-cert.pem`, `ca-key.pem`), the layouts of the
//! directories it issues into (the ones `--peer-tls-dir`, nbdkit-style `--tls-certificates`
//! and libnbd's `tls-certificates=` read), and the profile of every certificate: ECDSA P-256,
//! a CA valid 10 years that signs leaves only, leaves valid 2 years with the extended key
//! usages their role needs. All X.509 and key generation is rcgen's.
//!
//! `init_ca` and `issue` are the API `blockrep up` can call to make its own CA on first start.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::{ArgGroup, Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use time::{Duration, OffsetDateTime};

/// The CA's certificate, in the CA directory and copied into every issued directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The CA's private key; it never leaves the CA directory.
pub const CA_KEY: &str = "ca-key.pem";

/// About 10 years (leap days included).
const CA_VALIDITY: Duration = Duration::days(3653);
/// About 2 years.
const LEAF_VALIDITY: Duration = Duration::days(731);
/// Certificates start this far in the past, so a peer whose clock runs a little behind
/// accepts a certificate issued a moment ago.
const CLOCK_SKEW: Duration = Duration::hours(1);
/// Private keys: readable by their owner only.
const KEY_MODE: u32 = 0o600;
/// Certificates are public: peers running as other users read them.
const CERT_MODE: u32 = 0o644;
/// The CA directory holds the CA key.
const CA_DIR_MODE: u32 = 0o700;
const MAX_DNS_NAME: usize = 253;
const MAX_DNS_LABEL: usize = 63;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "{} already holds a CA; pass --force to replace it (certificates it issued stop being trusted)",
        dir.display()
    )]
    CaExists { dir: PathBuf },
    #[error("no CA in {0}: run `blockrep certs init {0}` first", dir.display())]
    NoCa { dir: PathBuf },
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a PEM {what}", path.display())]
    Parse { path: PathBuf, what: &'static str },
    #[error("{} is not a CA certificate (no CA basic constraint)", path.display())]
    NotCa { path: PathBuf },
    #[error("the CA certificate {} has expired or is not valid yet", path.display())]
    CaExpired { path: PathBuf },
    #[error("{} is not the key of the CA certificate {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("say what the certificate is for: --node, --server or --client")]
    NoKind,
    #[error("generating the certificate")]
    Generate(#[from] rcgen::Error),
}

/// What an issued certificate is for; decides its file names and extended key usages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Mutual TLS between nodes: both serverAuth and clientAuth.
    Node,
    /// An NBD server (`--tls-certificates`): serverAuth.
    Server,
    /// An NBD client (libnbd's `tls-certificates=`): clientAuth.
    Client,
}

impl Kind {
    fn stem(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Server => "server",
            Kind::Client => "client",
        }
    }

    /// `node-cert.pem`, `server-cert.pem` or `client-cert.pem`.
    pub fn cert_file(self) -> String {
        format!("{}-cert.pem", self.stem())
    }

    /// `node-key.pem`, `server-key.pem` or `client-key.pem`.
    pub fn key_file(self) -> String {
        format!("{}-key.pem", self.stem())
    }

    fn extended_key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Kind::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Kind::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Kind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        }
    }
}

/// A subject alternative name: an IP address if it parses as one, else a DNS name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum San {
    Dns(String),
    Ip(IpAddr),
}

impl FromStr for San {
    type Err = CertError;

    fn from_str(s: &str) -> Result<San, CertError> {
        let s = s.trim();
        match s.parse::<IpAddr>() {
            Ok(ip) => Ok(San::Ip(ip)),
            Err(_) => Ok(San::Dns(dns_name(s)?)),
        }
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(name) => f.write_str(name),
            San::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Checks that `name` is a DNS name TLS libraries accept as a certificate identity:
/// dot-separated labels of ASCII letters, digits and inner hyphens.
fn dns_name(name: &str) -> Result<String, CertError> {
    let bad = |reason| CertError::BadName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_DNS_NAME {
        return Err(bad("a DNS name has at most 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_DNS_LABEL {
            return Err(bad("each dot-separated part needs 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad("use only ASCII letters, digits, '-' and '.'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a part may not start or end with '-'"));
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// One certificate to issue: its role, the name it carries (CN and a DNS SAN) and the
/// subject alternative names beside that name.
#[derive(Clone, Debug)]
pub struct Leaf {
    kind: Kind,
    name: String,
    sans: Vec<San>,
}

impl Leaf {
    /// Validates `name`; a server given no SANs answers as 127.0.0.1 and localhost too,
    /// so a local NBD server works with no flags.
    pub fn new(kind: Kind, name: &str, mut sans: Vec<San>) -> Result<Leaf, CertError> {
        let name = dns_name(name)?;
        if kind == Kind::Server && sans.is_empty() {
            sans = vec![
                San::Ip(IpAddr::from([127, 0, 0, 1])),
                San::Dns("localhost".to_owned()),
            ];
        }
        let mut all = vec![San::Dns(name.clone())];
        for san in sans {
            if !all.contains(&san) {
                all.push(san);
            }
        }
        Ok(Leaf {
            kind,
            name,
            sans: all,
        })
    }

    fn params(&self, now: OffsetDateTime) -> Result<CertificateParams, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(&self.name);
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + LEAF_VALIDITY;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = self.kind.extended_key_usages();
        params.use_authority_key_identifier_extension = true;
        params.subject_alt_names = self
            .sans
            .iter()
            .map(|san| match san {
                San::Ip(ip) => Ok(SanType::IpAddress(*ip)),
                San::Dns(name) => Ok(SanType::DnsName(name.as_str().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        Ok(params)
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "blockrep");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The files `issue` wrote.
#[derive(Clone, Debug)]
pub struct Issued {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether `dir` already holds (part of) a CA.
pub fn has_ca(dir: &Path) -> bool {
    dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists()
}

/// Creates a CA in `dir` (made 0700 if missing): `ca-cert.pem` and `ca-key.pem`. An existing
/// CA is replaced only with `force`, since every certificate it issued stops being trusted.
pub fn init_ca(dir: &Path, force: bool) -> Result<(), CertError> {
    if has_ca(dir) && !force {
        return Err(CertError::CaExists {
            dir: dir.to_owned(),
        });
    }
    create_dir(dir, CA_DIR_MODE)?;
    let key = KeyPair::generate()?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    // The key's identifier in the name tells one deployment's CA from another's in
    // tools' output and keeps issuer lookups by name unambiguous.
    let id = params.key_identifier(&key);
    let id: String = id.iter().take(4).map(|b| format!("{b:02x}")).collect();
    params.distinguished_name = distinguished_name(&format!("blockrep CA {id}"));
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    // The key first: a CA certificate never stands beside a key that is not its own
    // unless the cert write itself fails.
    write_file(
        &dir.join(CA_KEY),
        key.serialize_pem().as_bytes(),
        Access::Secret,
    )?;
    write_file(&dir.join(CA_CERT), cert.pem().as_bytes(), Access::Public)
}

/// Issues `leaf` signed by the CA in `ca_dir` into `out` (created if missing): the CA's
/// certificate, the leaf's certificate and its key. Existing leaf files are replaced, which
/// is how a certificate is renewed.
pub fn issue(ca_dir: &Path, leaf: &Leaf, out: &Path) -> Result<Issued, CertError> {
    let ca = LoadedCa::load(ca_dir)?;
    let key = KeyPair::generate()?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, &ca.key)?;
    let cert = leaf
        .params(OffsetDateTime::now_utc())?
        .signed_by(&key, &issuer)?;
    create_dir(out, 0o755)?;
    let issued = Issued {
        ca_cert: out.join(CA_CERT),
        cert: out.join(leaf.kind.cert_file()),
        key: out.join(leaf.kind.key_file()),
    };
    write_file(&issued.key, key.serialize_pem().as_bytes(), Access::Secret)?;
    write_file(&issued.cert, cert.pem().as_bytes(), Access::Public)?;
    write_file(&issued.ca_cert, ca.cert_pem.as_bytes(), Access::Public)?;
    Ok(issued)
}

/// A CA read back from its directory, checked before it signs anything.
struct LoadedCa {
    cert_pem: String,
    key: KeyPair,
}

impl LoadedCa {
    fn load(dir: &Path) -> Result<LoadedCa, CertError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if !cert_path.exists() || !key_path.exists() {
            return Err(CertError::NoCa {
                dir: dir.to_owned(),
            });
        }
        let cert_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|_| CertError::Parse {
            path: key_path.clone(),
            what: "private key",
        })?;
        let not_cert = || CertError::Parse {
            path: cert_path.clone(),
            what: "certificate",
        };
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|_| not_cert())?;
        let x509 = pem.parse_x509().map_err(|_| not_cert())?;
        if !x509.is_ca() {
            return Err(CertError::NotCa { path: cert_path });
        }
        if !x509.validity().is_valid() {
            return Err(CertError::CaExpired { path: cert_path });
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CertError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        Ok(LoadedCa { cert_pem, key })
    }
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path, mode: u32) -> Result<(), CertError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|source| CertError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Who may read a file `write_file` makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// A private key: `KEY_MODE` from the moment it exists (the umask can only narrow it).
    Secret,
    /// A certificate: exactly `CERT_MODE`, whatever the umask.
    Public,
}

/// Writes `contents` to `path` atomically (a new file renamed over it) and durably (the file
/// and its directory are synced). Invariant *keys_are_created_0600*: a secret file is created
/// with its final mode, so a key is never readable by others, not even for a moment.
fn write_file(path: &Path, contents: &[u8], access: Access) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // A stale one from a crash; create_new below then guarantees that the file written is
    // the one created here with `mode` (never a file or link someone else left).
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(match access {
                Access::Secret => KEY_MODE,
                Access::Public => CERT_MODE,
            })
            .open(&tmp)?;
        if access == Access::Public {
            file.set_permissions(fs::Permissions::from_mode(CERT_MODE))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// `blockrep certs ...`.
#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a certificate authority in DIR: ca-cert.pem and ca-key.pem (0600). The CA is
    /// valid for 10 years and signs only the certificates `issue` makes.
    Init {
        /// Where to create it (made 0700 if missing; keep it off the nodes if you can).
        dir: PathBuf,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the CA in DIR into OUT (created if missing), valid for
    /// 2 years: OUT/ca-cert.pem plus node-, server- or client-cert.pem and -key.pem (0600).
    /// Issuing again replaces them (that is how to renew).
    Issue(IssueArgs),
}

#[derive(Args)]
#[command(group(ArgGroup::new("kind").required(true).args(["node", "server", "client"])))]
pub struct IssueArgs {
    /// The CA's directory (made by `blockrep certs init`).
    dir: PathBuf,
    /// For mutual TLS between nodes (--peer-tls-dir): node-cert.pem and node-key.pem,
    /// serverAuth and clientAuth; NAME is the node's --name.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// For an NBD server (--tls-certificates): server-cert.pem and server-key.pem, serverAuth;
    /// without --san it also answers as 127.0.0.1 and localhost.
    #[arg(long, value_name = "NAME")]
    server: Option<String>,
    /// For an NBD client (libnbd's tls-certificates=OUT): client-cert.pem and client-key.pem,
    /// clientAuth.
    #[arg(long, value_name = "NAME")]
    client: Option<String>,
    /// Where to write the files.
    #[arg(long)]
    out: PathBuf,
    /// More names the certificate answers to besides NAME, comma-separated: host names, or
    /// IP addresses (which become IP SANs).
    #[arg(long, value_name = "HOST,IP,...", value_delimiter = ',')]
    san: Vec<San>,
}

impl IssueArgs {
    fn leaf(&self) -> Result<Leaf, CertError> {
        let (kind, name) = match (&self.node, &self.server, &self.client) {
            (Some(name), _, _) => (Kind::Node, name),
            (_, Some(name), _) => (Kind::Server, name),
            (_, _, Some(name)) => (Kind::Client, name),
            // clap's required group makes this unreachable; an error says so if it is not.
            (None, None, None) => return Err(CertError::NoKind),
        };
        Leaf::new(kind, name, self.san.clone())
    }
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { dir, force } => {
            init_ca(&dir, force)?;
            println!(
                "created a CA in {} ({CA_CERT}, {CA_KEY}); keep {CA_KEY} private",
                dir.display()
            );
        }
        CertsCommand::Issue(args) => {
            let leaf = args.leaf()?;
            let issued = issue(&args.dir, &leaf, &args.out)?;
            let sans: Vec<String> = leaf.sans.iter().map(San::to_string).collect();
            println!(
                "issued a {} certificate for {} (answers to {}): {}, {}, {}",
                leaf.kind.stem(),
                leaf.name,
                sans.join(", "),
                issued.cert.display(),
                issued.key.display(),
                issued.ca_cert.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_ips_become_ip_sans() {
        assert_eq!(
            "10.0.0.7".parse::<San>().ok(),
            Some(San::Ip([10, 0, 0, 7].into()))
        );
        assert_eq!(
            "::1".parse::<San>().ok(),
            Some(San::Ip("::1".parse().unwrap()))
        );
        assert_eq!(
            "Node-1.example".parse::<San>().ok(),
            Some(San::Dns("node-1.example".into()))
        );
        for bad in ["", "a b", "-x", "x-", "a..b", "a,b", "é", "under_score"] {
            assert!(bad.parse::<San>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_server_answers_locally_unless_given_sans() {
        let local = Leaf::new(Kind::Server, "nbd", vec![]).unwrap();
        assert_eq!(local.sans.len(), 3);
        let given = Leaf::new(Kind::Server, "nbd", vec![San::Dns("nbd".into())]).unwrap();
        assert_eq!(given.sans, vec![San::Dns("nbd".into())]);
        let node = Leaf::new(Kind::Node, "r1", vec![]).unwrap();
        assert_eq!(node.sans, vec![San::Dns("r1".into())]);
    }

    /// Handshakes in memory, with rustls (the nodes' TLS library) at both ends.
    mod rustls_handshake {
        use super::*;
        use rustls::crypto::CryptoProvider;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        use rustls::server::WebPkiClientVerifier;
        use rustls::{
            CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore,
            ServerConfig, ServerConnection, SupportedProtocolVersion,
        };
        use std::sync::Arc;

        fn provider() -> Arc<CryptoProvider> {
            Arc::new(rustls::crypto::ring::default_provider())
        }

        fn identity(
            dir: &Path,
            kind: Kind,
        ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let cert = CertificateDer::from_pem_file(dir.join(kind.cert_file())).unwrap();
            let key = PrivateKeyDer::from_pem_file(dir.join(kind.key_file())).unwrap();
            (vec![cert], key)
        }

        fn roots(dir: &Path) -> Arc<RootCertStore> {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(dir.join(CA_CERT)).unwrap())
                .unwrap();
            Arc::new(roots)
        }

        /// Moves every pending TLS record from `from` to `to` and lets `to` process them.
        fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
            let mut wire = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut wire).unwrap();
            }
            let mut rest = &wire[..];
            while !rest.is_empty() {
                to.read_tls(&mut rest).unwrap();
                to.process_new_packets()?;
            }
            Ok(())
        }

        /// A server with `server`'s certificate requiring a client certificate from its CA;
        /// a client with `client`'s certificate checking the server as `name`.
        fn handshake(
            version: &'static SupportedProtocolVersion,
            server: (&Path, Kind),
            client: (&Path, Kind),
            name: &str,
        ) -> Result<(), rustls::Error> {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(server.0), provider())
                .build()
                .unwrap();
            let (chain, key) = identity(server.0, server.1);
            let server_config = ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?;
            let (chain, key) = identity(client.0, client.1);
            let client_config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])?
                .with_root_certificates(roots(client.0))
                .with_client_auth_cert(chain, key)?;
            let name = ServerName::try_from(name.to_owned()).unwrap();
            let mut c = Connection::from(ClientConnection::new(Arc::new(client_config), name)?);
            let mut s = Connection::from(ServerConnection::new(Arc::new(server_config))?);
            while c.is_handshaking() || s.is_handshaking() {
                pump(&mut c, &mut s)?;
                pump(&mut s, &mut c)?;
            }
            // TLS 1.3 judges the client's certificate after the client thinks it is done.
            pump(&mut c, &mut s)
        }

        fn ca_and(tmp: &Path, issue_all: &[(Kind, &str, &str)]) -> PathBuf {
            let ca = tmp.join("ca");
            init_ca(&ca, false).unwrap();
            for (kind, name, out) in issue_all {
                issue(
                    &ca,
                    &Leaf::new(*kind, name, vec![]).unwrap(),
                    &tmp.join(out),
                )
                .unwrap();
            }
            ca
        }

        const VERSIONS: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS12, &rustls::version::TLS13];

        #[test]
        fn node_certificates_authenticate_both_ends_in_rustls() {
            let tmp = tempfile::tempdir().unwrap();
            let t = tmp.path();
            ca_and(t, &[(Kind::Node, "r1", "r1"), (Kind::Node, "primary", "p")]);
            let (r1, p) = (t.join("r1"), t.join("p"));
            for v in VERSIONS {
                handshake(v, (&r1, Kind::Node), (&p, Kind::Node), "r1").unwrap();
                // Either node can be either end.
                handshake(v, (&p, Kind::Node), (&r1, Kind::Node), "primary").unwrap();
                let wrong = handshake(v, (&r1, Kind::Node), (&p, Kind::Node), "r2");
                assert!(
                    matches!(wrong, Err(rustls::Error::InvalidCertificate(_))),
                    "{wrong:?}"
                );
            }
        }

        #[test]
        fn server_and_client_certificates_work_in_rustls_and_only_in_their_roles() {
            let tmp = tempfile::tempdir().unwrap();
            let t = tmp.path();
            ca_and(
                t,
                &[(Kind::Server, "nbd1", "s"), (Kind::Client, "alice", "c")],
            );
            let other = tmp.path().join("other");
            fs::create_dir(&other).unwrap();
            ca_and(&other, &[(Kind::Client, "alice", "c")]);
            let (s, c, stranger) = (t.join("s"), t.join("c"), other.join("c"));
            for v in VERSIONS {
                for name in ["nbd1", "localhost", "127.0.0.1"] {
                    handshake(v, (&s, Kind::Server), (&c, Kind::Client), name).unwrap();
                }
                let refused = handshake(v, (&s, Kind::Server), (&stranger, Kind::Client), "nbd1");
                assert!(
                    matches!(
                        refused,
                        Err(rustls::Error::InvalidCertificate(
                            CertificateError::UnknownIssuer
                        ))
                    ),
                    "another CA's client: {refused:?}"
                );
                // No clientAuth usage in a server certificate, no serverAuth in a client's.
                let refused = handshake(v, (&s, Kind::Server), (&s, Kind::Server), "nbd1");
                assert!(
                    refused.is_err(),
                    "server certificate as client: {refused:?}"
                );
                let refused = handshake(v, (&c, Kind::Client), (&c, Kind::Client), "alice");
                assert!(
                    refused.is_err(),
                    "client certificate as server: {refused:?}"
                );
            }
        }
    }
}
