//! Mutual TLS between nodes, end to end: real `blockrep` processes with certificates made by
//! `blockrep certs`, a real NBD client (qemu-io, nbdcopy), and strangers that speak the
//! replication wire format (frames built with the crate's own `wire` encoder) in plaintext,
//! over TLS with no certificate, and over TLS with a certificate from another CA. Each is
//! refused before a frame reaches the replica's core: the replica's epoch, LSNs and data stay
//! as they were, the real primary keeps answering FLUSH, and
//! `blockrep_peer_rejects_total{reason}` says why. A replica presenting another name's
//! certificate is refused by the primary; `blockrep up` makes and reuses its own certificates.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blockrep_replication::wire::{self, Body, Frame};
use blockrep_storage::{Epoch, Lsn, RecordKind, VolumeId, WalRecord};
use bytes::{Bytes, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use common::admin::{get_ok, Scrape};
use common::*;

const VOLUME: u64 = 32 * MIB;
const REJECTS: &str = "blockrep_peer_rejects_total";

/// A CA made with `blockrep certs init` and node certificates issued from it.
struct Pki {
    ca: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca = dir.join("ca");
        run_ok(blockrep_timed(60).arg("certs").arg("init").arg(&ca));
        Pki { ca }
    }

    /// `blockrep certs issue CA --node NAME --out DIR`.
    fn node(&self, name: &str, out: &Path) -> PathBuf {
        run_ok(
            blockrep_timed(60)
                .arg("certs")
                .arg("issue")
                .arg(&self.ca)
                .args(["--node", name, "--out"])
                .arg(out),
        );
        out.to_path_buf()
    }
}

fn create(parent: &Path, name: &str) -> PathBuf {
    create_store(parent, name, VOLUME)
}

fn tls_args(dir: &Path, name: &str) -> Vec<OsString> {
    vec![
        "--peer-tls-dir".into(),
        dir.into(),
        "--name".into(),
        name.into(),
    ]
}

/// `blockrep replica STORE --listen ... --metrics ...` with `extra`.
fn replica(name: &str, store: &Path, extra: Vec<OsString>) -> Node {
    let port = free_port();
    let metrics = free_port();
    let mut args: Vec<OsString> = vec![
        "replica".into(),
        store.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
        "--metrics".into(),
        format!("127.0.0.1:{metrics}").into(),
    ];
    args.extend(extra);
    Node::builder(name, store, port, args)
        .ready(Ready::LineAndAdmin("listening on"))
        .stop_timeout(30)
        .try_start()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `blockrep serve STORE` replicating to `replicas` (NAME, node) with `extra`.
fn primary(store: &Path, replicas: &[(&str, &Node)], extra: Vec<OsString>) -> Node {
    let port = free_port();
    let metrics = free_port();
    let mut args = common::node::serve_args(store, port, &[]);
    for (name, r) in replicas {
        args.push("--replica".into());
        args.push(format!("{name}={}", r.addr()).into());
    }
    args.extend(["--metrics".into(), format!("127.0.0.1:{metrics}").into()]);
    args.extend(extra);
    Node::builder("p", store, port, args)
        .ready(Ready::LineAndAdmin("serving"))
        .stop_timeout(30)
        .try_start()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String, String> {
    require("qemu-io");
    let mut c = timed(60, "qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    let text = format!("{}{}", text(&out.stdout), text(&out.stderr));
    if out.status.success() && !text.contains("failed") {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `blockrep export STORE IMAGE`, returning the image's bytes.
fn export(store: &Path, tmp: &Path, name: &str) -> Vec<u8> {
    let image = tmp.join(format!("{name}.img"));
    run_ok(blockrep_timed(120).arg("export").arg(store).arg(&image));
    std::fs::read(&image).expect("the exported image")
}

/// The replica's epoch and LSNs as its admin endpoint reports them.
fn positions(node: &Node) -> (u64, u64, u64, u64) {
    let status: serde_json::Value =
        serde_json::from_str(&get_ok(&format!("http://{}/v1/status", node.admin)))
            .expect("status JSON");
    let n = |k: &str| {
        status[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {status}"))
    };
    (
        n("epoch"),
        n("head_lsn"),
        n("durable_lsn"),
        n("committed_lsn"),
    )
}

fn rejects(node: &Node, reason: &str) -> f64 {
    let port = node
        .admin
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{} has no admin address", node.name));
    Scrape::of(port)
        .find(REJECTS, &[("reason", reason)])
        .unwrap_or(0.0)
}

#[test]
fn a_primary_and_two_replicas_over_mutual_tls_replicate_writes_and_flushes() {
    require("nbdcopy");
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let t = tmp.path();
    let pki = Pki::new(t);
    let stores: Vec<PathBuf> = ["p", "r1", "r2"].iter().map(|n| create(t, n)).collect();
    let certs: Vec<PathBuf> = ["primary", "r1", "r2"]
        .iter()
        .map(|n| pki.node(n, &t.join(format!("tls-{n}"))))
        .collect();
    let mut r1 = replica("r1", &stores[1], tls_args(&certs[1], "r1"));
    let mut r2 = replica("r2", &stores[2], tls_args(&certs[2], "r2"));
    let mut p = primary(
        &stores[0],
        &[("r1", &r1), ("r2", &r2)],
        tls_args(&certs[0], "primary"),
    );
    p.wait_log(0, &["replica=r1", "state=\"in_sync\""], 30);
    p.wait_log(0, &["replica=r2", "state=\"in_sync\""], 30);

    let src = t.join("src.img");
    std::fs::write(&src, random_bytes(11, 4 * MIB as usize)).expect("source image");
    run_ok(timed(120, "nbdcopy").arg("--flush").arg(&src).arg(p.uri()));
    qemu_io(&p.uri(), &["write -P 0xab 5M 64k", "flush"]).expect("qemu-io write + flush");
    assert_eq!(rejects(&r1, "plaintext"), 0.0);
    p.stop_ok();
    r1.stop_ok();
    r2.stop_ok();
    let want = export(&stores[0], t, "p");
    assert_eq!(
        &want[..4 * MIB as usize],
        &std::fs::read(&src).expect("src")[..]
    );
    for (i, name) in [(1, "r1"), (2, "r2")] {
        assert!(
            export(&stores[i], t, name) == want,
            "{name} does not hold what the primary holds"
        );
    }
}

/// Accepts any server certificate: the strangers attack the replica's check, not their own.
#[derive(Debug)]
struct TrustAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How a stranger reaches the replica's port.
#[derive(Clone)]
enum Stranger {
    Plaintext,
    /// TLS, presenting the node certificate in this directory, or none.
    Tls(Option<PathBuf>),
}

impl Stranger {
    /// Connects to `addr`, sends `frame`, and reads whatever comes back until the replica
    /// closes (every error is the replica refusing; none may be a frame answer).
    fn attack(&self, addr: &str, frame: &Frame) -> Vec<u8> {
        let mut buf = BytesMut::new();
        wire::encode(frame, &mut buf);
        let tcp = TcpStream::connect(addr).expect("connect to the replica");
        tcp.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        let mut got = Vec::new();
        match self {
            Stranger::Plaintext => {
                let mut s = tcp;
                let _ = s.write_all(&buf);
                let _ = s.read_to_end(&mut got);
            }
            Stranger::Tls(identity) => {
                let mut s = rustls::StreamOwned::new(self.client(identity.as_deref()), tcp);
                let _ = s.write_all(&buf).and_then(|()| s.flush());
                let _ = s.read_to_end(&mut got);
            }
        }
        got
    }

    fn client(&self, identity: Option<&Path>) -> rustls::ClientConnection {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TrustAnything(provider)));
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(dir) => {
                let chain = CertificateDer::pem_file_iter(dir.join("node-cert.pem"))
                    .expect("node cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("node cert");
                let key = PrivateKeyDer::from_pem_file(dir.join("node-key.pem")).expect("key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client cert")
            }
        };
        let name = ServerName::try_from("r1").expect("a name");
        rustls::ClientConnection::new(Arc::new(config), name).expect("a TLS client")
    }
}

/// Every frame an attacker would send a replica.
fn attack_frames(volume_id: VolumeId, epoch: u64) -> Vec<Frame> {
    let write = WalRecord::new(
        Lsn(1),
        Epoch(epoch + 1),
        RecordKind::Write,
        0,
        4096,
        Bytes::from(vec![0xEE; 4096]),
    );
    let bodies = [
        (epoch, Body::Probe { fence: None }),
        (
            epoch + 1,
            Body::Hello {
                volume_id,
                volume_size: VOLUME,
                primary_store: VolumeId([0x66; 16]),
                head: Lsn(1),
                committed: Lsn::ZERO,
            },
        ),
        (
            epoch + 1,
            Body::Entries {
                committed: Lsn(1),
                records: vec![write],
            },
        ),
        (
            epoch + 1,
            Body::RebuildStart {
                base: Lsn(1),
                history: vec![(Epoch(epoch + 1), Lsn(1))],
                resume: None,
            },
        ),
        (
            u64::MAX,
            Body::Probe {
                fence: Some(VolumeId([0x66; 16])),
            },
        ),
    ];
    bodies
        .into_iter()
        .map(|(e, body)| Frame {
            epoch: Epoch(e),
            body,
        })
        .collect()
}

#[test]
fn strangers_are_refused_before_any_frame_and_change_nothing() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let t = tmp.path();
    let pki = Pki::new(t);
    let other = Pki::new(&t.join("other"));
    let p_store = create(t, "p");
    let r_store = create(t, "r1");
    let volume = volume_id(&p_store);
    let p_certs = pki.node("primary", &t.join("tls-primary"));
    let r_certs = pki.node("r1", &t.join("tls-r1"));
    let foreign = other.node("primary", &t.join("tls-foreign"));

    let mut r = replica("r1", &r_store, tls_args(&r_certs, "r1"));
    let mut p = primary(&p_store, &[("r1", &r)], tls_args(&p_certs, "primary"));
    p.wait_log(0, &["replica=r1", "state=\"in_sync\""], 30);
    qemu_io(&p.uri(), &["write -P 0x5a 0 128k", "flush"]).expect("a first write + flush");
    wait_until(
        Duration::from_secs(30),
        "the replica to hold the first write",
        || positions(&r).2 >= 1,
    );
    let before = positions(&r);
    let mark = r.mark();

    let strangers = [
        ("plaintext", Stranger::Plaintext),
        ("no_certificate", Stranger::Tls(None)),
        ("unknown_ca", Stranger::Tls(Some(foreign))),
    ];
    for (reason, stranger) in &strangers {
        for frame in attack_frames(volume, before.0) {
            let what = frame.body.name();
            let got = stranger.attack(&r.addr(), &frame);
            // A plaintext peer gets nothing back at all; a TLS one at most TLS records.
            if matches!(stranger, Stranger::Plaintext) {
                assert!(got.is_empty(), "{reason} {what}: answered {got:?}");
            }
        }
        wait_until(
            Duration::from_secs(30),
            format_args!("{REJECTS}{{reason={reason}}} to count 5 refusals"),
            || rejects(&r, reason) >= 5.0,
        );
    }
    assert_eq!(positions(&r), before, "a stranger changed the replica");
    assert!(r.running(), "the replica died:\n{}", r.log());

    // The real primary was not fenced: its writes and FLUSHes still go through.
    qemu_io(&p.uri(), &["write -P 0x77 1M 64k", "flush"]).expect("write + flush after");
    assert!(positions(&r).1 > before.1, "the replica stopped following");

    // One stranger connecting 20 times more is still one log line.
    for _ in 0..20 {
        Stranger::Plaintext.attack(&r.addr(), &attack_frames(volume, 0)[0]);
    }
    wait_until(
        Duration::from_secs(30),
        "25 plaintext refusals counted",
        || rejects(&r, "plaintext") >= 25.0,
    );
    let lines = r.lines_with(
        mark,
        &["refused a replication peer", "reason=\"plaintext\""],
    );
    assert_eq!(lines.len(), 1, "logged more than once: {lines:#?}");
    for reason in ["no_certificate", "unknown_ca"] {
        let needle = format!("reason=\"{reason}\"");
        let lines = r.lines_with(mark, &["refused a replication peer", &needle]);
        assert_eq!(lines.len(), 1, "{reason} logged {lines:#?}");
    }

    p.stop_ok();
    r.stop_ok();
    assert!(
        export(&r_store, t, "r1") == export(&p_store, t, "p"),
        "the replica's data differs from the primary's"
    );
    assert_eq!(inspect_json(&r_store)["epoch"], before.0);
}

#[test]
fn a_replica_with_another_names_certificate_is_refused_by_the_primary() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let t = tmp.path();
    let pki = Pki::new(t);
    let p_store = create(t, "p");
    let r_store = create(t, "r");
    let p_certs = pki.node("primary", &t.join("tls-primary"));
    let r2_certs = pki.node("r2", &t.join("tls-r2"));
    // A genuine node of the volume, but r2: dialed as r1, it must be refused.
    let mut r = replica("r2", &r_store, tls_args(&r2_certs, "r2"));
    let mut p = primary(
        &p_store,
        &[("r1", &r)],
        [
            tls_args(&p_certs, "primary"),
            vec!["--commit".into(), "best-effort".into()],
        ]
        .concat(),
    );
    wait_until(
        Duration::from_secs(30),
        "the primary to count a wrong_name refusal",
        || rejects(&p, "wrong_name") >= 1.0,
    );
    let lines = p.lines_with(0, &["refused a replication peer", "reason=\"wrong_name\""]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    p.stop_ok();
    r.stop_ok();
    assert_eq!(inspect_json(&r_store)["epoch"], 0, "the replica followed");
}

#[test]
fn a_node_whose_certificate_lacks_its_name_or_a_file_refuses_to_start() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let t = tmp.path();
    let pki = Pki::new(t);
    let store = create(t, "r");
    let certs = pki.node("r1", &t.join("tls-r1"));
    let start = |args: Vec<OsString>| {
        let out = run(blockrep_timed(60)
            .args(["replica".as_ref(), store.as_os_str()])
            .args(["--listen", "127.0.0.1:0", "--metrics", "off"])
            .args(args));
        assert!(!out.status.success(), "started: {}", describe(&out));
        text(&out.stderr)
    };
    let err = start(tls_args(&certs, "r2"));
    assert!(err.contains("not valid for the node name \"r2\""), "{err}");
    let err = start(vec!["--peer-tls-dir".into(), certs.clone().into()]);
    assert!(err.contains("needs --name"), "{err}");
    // The same keys in a config file.
    let config = t.join("replica.toml");
    let body = format!(
        "peer-tls-dir = {:?}\nname = \"r3\"\n",
        certs.display().to_string()
    );
    std::fs::write(&config, body).expect("config file");
    let err = start(vec!["--config".into(), config.into()]);
    assert!(err.contains("not valid for the node name \"r3\""), "{err}");
    std::fs::remove_file(certs.join("node-key.pem")).expect("remove the key");
    let err = start(tls_args(&certs, "r1"));
    assert!(err.contains("node-key.pem: missing"), "{err}");
}

#[test]
fn plaintext_replication_off_loopback_is_warned_about_at_start() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let store = create(tmp.path(), "r");
    let port = free_port();
    let args: Vec<OsString> = vec![
        "replica".into(),
        store.clone().into(),
        "--listen".into(),
        format!("0.0.0.0:{port}").into(),
        "--metrics".into(),
        "off".into(),
    ];
    let mut r = Node::builder("r", &store, port, args)
        .ready(Ready::Line("listening on"))
        .try_start()
        .unwrap_or_else(|e| panic!("{e}"));
    r.wait_log(
        0,
        &["exposed: the replication port 0.0.0.0", "--peer-tls-dir"],
        30,
    );
    r.stop_ok();
    // On loopback, as the other tests run, it says nothing.
    let mut quiet = replica("r", &store, Vec::new());
    quiet.stop_ok();
    assert!(!quiet.log().contains("exposed: the replication port 127"));
}

#[test]
fn up_makes_its_certificates_once_and_serves_nbds_with_them() {
    require("nbdinfo");
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let data = tmp.path().join("data");
    let port = free_port();
    let args: Vec<OsString> = vec![
        "up".into(),
        "--dir".into(),
        data.clone().into(),
        "--size".into(),
        "64MiB".into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
        "--tls".into(),
        "require".into(),
    ];
    let mut up = Node::builder("up", &data, port, args)
        .ready(Ready::Started)
        .wait_for_port()
        .start();
    let tls = data.join("tls");
    let client = tls.join("client");
    let uri = format!(
        "nbds://127.0.0.1:{port}/blockrep?tls-certificates={}",
        client.display()
    );
    up.wait_log(0, &[&uri], 30);
    let keys = [
        "ca/ca-key.pem",
        "primary/node-key.pem",
        "r1/node-key.pem",
        "r2/node-key.pem",
        "server/server-key.pem",
        "client/client-key.pem",
    ];
    for key in keys {
        let mode = std::fs::metadata(tls.join(key))
            .unwrap_or_else(|e| panic!("{key}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key} is {mode:o}");
    }
    let certs: Vec<Vec<u8>> = [
        "primary/node-cert.pem",
        "r1/node-cert.pem",
        "ca/ca-cert.pem",
    ]
    .iter()
    .map(|c| std::fs::read(tls.join(c)).expect("a certificate"))
    .collect();
    let nbdinfo = |uri: &str| run(Command::new("timeout").args(["60", "nbdinfo", uri]));
    let out = nbdinfo(&uri);
    assert!(out.status.success(), "nbdinfo {uri}: {}", describe(&out));
    // Its replicas run over mutual TLS: a FLUSH (sync-all) succeeds only with both.
    require("nbdcopy");
    let src = tmp.path().join("src.img");
    std::fs::write(&src, random_bytes(5, MIB as usize)).expect("source image");
    run_ok(timed(120, "nbdcopy").arg("--flush").arg(&src).arg(&uri));
    up.stop_ok();

    let mark = up.mark();
    up.restart();
    up.wait_log(mark, &[&uri], 30);
    let again: Vec<Vec<u8>> = [
        "primary/node-cert.pem",
        "r1/node-cert.pem",
        "ca/ca-cert.pem",
    ]
    .iter()
    .map(|c| std::fs::read(tls.join(c)).expect("a certificate"))
    .collect();
    assert!(again == certs, "a second start replaced the certificates");
    let out = nbdinfo(&uri);
    assert!(
        out.status.success(),
        "nbdinfo after restart: {}",
        describe(&out)
    );
    up.stop_ok();
}

#[test]
fn node_certificates_made_by_certtool_with_padded_ecdsa_keys_replicate() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let t = tmp.path();
    let ca = common::certtool::Pki::new(t, "gnutls-ca");
    let nodes = t.join("certtool-nodes");
    let p_dir = ca.node_dir(&nodes, "primary", "ecdsa");
    let r_dir = ca.node_dir(&nodes, "r1", "ecdsa");
    let (p_store, r_store) = (create(t, "p"), create(t, "r1"));
    let mut r1 = replica("r1", &r_store, tls_args(&r_dir, "r1"));
    let mut p = primary(&p_store, &[("r1", &r1)], tls_args(&p_dir, "primary"));
    p.wait_log(0, &["replica=r1", "state=\"in_sync\""], 30);
    qemu_io(&p.uri(), &["write -P 0xcd 1M 64k", "flush"]).expect("qemu-io write + flush");
    p.stop_ok();
    r1.stop_ok();
    let want = export(&p_store, t, "p");
    assert!(
        want[MIB as usize..MIB as usize + 65536]
            .iter()
            .all(|b| *b == 0xcd),
        "the primary holds the write"
    );
    assert!(
        export(&r_store, t, "r1") == want,
        "r1 does not hold what the primary holds"
    );
}
