use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// A CA, and a function issuing node certificates from it into directories.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// Writes `ca-cert.pem`, `node-cert.pem` and `node-key.pem` for `name` into `dir`.
    fn issue(&self, name: &str, dir: &Path) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(CA_CERT), &self.pem).unwrap();
        std::fs::write(dir.join(NODE_CERT), cert.pem()).unwrap();
        std::fs::write(dir.join(NODE_KEY), key.serialize_pem()).unwrap();
    }
}

fn node(ca: &Ca, tmp: &Path, name: &str) -> PeerTls {
    let dir = tmp.join(name);
    ca.issue(name, &dir);
    PeerTls::load(&dir, name).unwrap()
}

#[test]
fn a_certificate_that_does_not_carry_the_name_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    ca.issue("r1", tmp.path());
    assert!(PeerTls::load(tmp.path(), "r1").is_ok());
    assert!(matches!(
        PeerTls::load(tmp.path(), "r2"),
        Err(PeerTlsError::NotForName { name, .. }) if name == "r2"
    ));
    // A directory whose CA did not sign the node certificate.
    std::fs::write(tmp.path().join(CA_CERT), Ca::new("other").pem).unwrap();
    assert!(matches!(
        PeerTls::load(tmp.path(), "r1"),
        Err(PeerTlsError::File {
            problem: FileProblem::Invalid(_),
            ..
        })
    ));
    std::fs::write(tmp.path().join(NODE_KEY), "not pem").unwrap();
    assert!(matches!(
        PeerTls::load(tmp.path(), "r1"),
        Err(PeerTlsError::File {
            problem: FileProblem::Invalid(_),
            ..
        })
    ));
    std::fs::remove_file(tmp.path().join(NODE_CERT)).unwrap();
    assert!(matches!(
        PeerTls::load(tmp.path(), "r1"),
        Err(PeerTlsError::File { path, problem: FileProblem::Missing }) if path.ends_with(NODE_CERT)
    ));
}

#[test]
fn rejects_are_logged_once_per_peer_and_reason_in_a_bounded_set() {
    let rejects = Rejects::default();
    for _ in 0..20 {
        rejects.reject("10.0.0.1", RejectReason::Plaintext, &"x");
    }
    assert_eq!(rejects.count(RejectReason::Plaintext), 20);
    assert_eq!(rejects.remembered(), 1);
    for i in 0..(MAX_LOGGED_PEERS * 2) {
        rejects.reject(&format!("peer {i}"), RejectReason::UnknownCa, &"x");
    }
    assert_eq!(rejects.remembered(), MAX_LOGGED_PEERS);
    assert_eq!(
        rejects.count(RejectReason::UnknownCa),
        2 * MAX_LOGGED_PEERS as u64
    );
    let mut recent = RecentPeers::default();
    assert!(recent.insert(("a".into(), RejectReason::Plaintext)));
    assert!(!recent.insert(("a".into(), RejectReason::Plaintext)));
    assert!(recent.insert(("a".into(), RejectReason::TlsError)));
}

#[test]
fn reasons_have_distinct_labels() {
    let labels: HashSet<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels.len(), RejectReason::ALL.len());
    for (i, r) in RejectReason::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
}

/// Accepts one connection on `server` and returns whether the handshake was admitted.
async fn accept_one(server: PeerTls, listener: TcpListener, within: Duration) -> bool {
    let (stream, addr) = listener.accept().await.unwrap();
    server
        .accept(stream, addr, Instant::now() + within)
        .await
        .is_some()
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

const LONG: Duration = Duration::from_secs(10);

#[tokio::test]
async fn mutual_tls_admits_the_volumes_nodes_and_names_each_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let r1 = node(&ca, tmp.path(), "r1");
    let primary = node(&ca, tmp.path(), "primary");
    let other = tmp.path().join("other");
    Ca::new("other").issue("primary", &other);
    // It trusts the replica (so only the replica's check can refuse it).
    let stranger = client(&tmp.path().join("r1"), Some(&other));

    // The volume's own primary, dialing r1 by its name, is admitted and can talk.
    let (l, addr) = listener().await;
    let accepted = tokio::spawn({
        let r1 = r1.clone();
        async move {
            let (stream, peer) = l.accept().await.unwrap();
            let mut s = r1
                .accept(stream, peer, Instant::now() + LONG)
                .await
                .unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            buf
        }
    });
    let Ok(PeerStream::Tls(mut s)) = dial(Some(&primary), "r1", &addr, LONG).await else {
        panic!("the primary could not dial r1");
    };
    s.write_all(b"hello").await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(&accepted.await.unwrap(), b"hello");

    // The same replica dialed as r2: refused on the primary's side.
    let (l, addr) = listener().await;
    let server = tokio::spawn(accept_one(r1.clone(), l, LONG));
    let refused = dial(Some(&primary), "r2", &addr, LONG).await;
    assert!(matches!(
        refused,
        Err(DialError::Refused(DialRefused {
            reason: RejectReason::WrongName,
            ..
        }))
    ));
    assert_eq!(primary.rejects().count(RejectReason::WrongName), 1);
    let _ = server.await;

    // A certificate from another CA: refused on the replica's side.
    let (l, addr) = listener().await;
    let server = tokio::spawn(accept_one(r1.clone(), l, LONG));
    let stream = TcpStream::connect(&addr).await.unwrap();
    talk(&stranger, stream).await;
    assert!(!server.await.unwrap());
    assert_eq!(r1.rejects().count(RejectReason::UnknownCa), 1);
}

#[tokio::test]
async fn plaintext_silent_and_certificateless_peers_are_refused_by_the_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let r1 = node(&ca, tmp.path(), "r1");

    let (l, addr) = listener().await;
    let server = tokio::spawn(accept_one(r1.clone(), l, LONG));
    let mut plain = TcpStream::connect(&addr).await.unwrap();
    plain.write_all(b"BRPL plaintext frame").await.unwrap();
    assert!(!server.await.unwrap());
    assert_eq!(r1.rejects().count(RejectReason::Plaintext), 1);

    let (l, addr) = listener().await;
    let server = tokio::spawn(accept_one(r1.clone(), l, Duration::from_millis(300)));
    let _silent = TcpStream::connect(&addr).await.unwrap();
    assert!(!server.await.unwrap());
    assert_eq!(r1.rejects().count(RejectReason::HandshakeTimeout), 1);

    // A TLS client that trusts the CA but has no certificate of its own.
    let config = client(&tmp.path().join("r1"), None);
    let (l, addr) = listener().await;
    let server = tokio::spawn(accept_one(r1.clone(), l, LONG));
    talk(&config, TcpStream::connect(&addr).await.unwrap()).await;
    assert!(!server.await.unwrap());
    assert_eq!(r1.rejects().count(RejectReason::NoCertificate), 1);
}

/// A client trusting the CA in `trusts`, presenting the node certificate in `identity`.
fn client(trusts: &Path, identity: Option<&Path>) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for c in blockrep_pem::certificates(&trusts.join(CA_CERT)).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        None => builder.with_no_client_auth(),
        Some(dir) => builder
            .with_client_auth_cert(
                blockrep_pem::certificates(&dir.join(NODE_CERT)).unwrap(),
                blockrep_pem::private_key(&dir.join(NODE_KEY)).unwrap(),
            )
            .unwrap(),
    }
}

/// Handshakes as `config` with the node called r1 and tries to exchange a byte.
async fn talk(config: &ClientConfig, stream: TcpStream) {
    let name = ServerName::try_from("r1").unwrap();
    if let Ok(mut s) = TlsConnector::from(Arc::new(config.clone()))
        .connect(name, stream)
        .await
    {
        // TLS 1.3: the client finishes first and hears of the refusal on its next read.
        let _ = s.write_all(b"x").await;
        let _ = s.read(&mut [0u8; 1]).await;
    }
}
