//! STARTTLS as the spec has it, over loopback with a rustls client and certificates made
//! by GnuTLS's certtool: the upgrade resets negotiation, there is no second upgrade, and
//! plaintext sent after STARTTLS is never obeyed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{negotiate, HandshakeError};
use crate::exports::Exports;
use crate::proto::*;
use crate::stream::Plain;
use crate::tls::{Tls, TlsMode, CA_CERT, SERVER_CERT, SERVER_KEY};
use crate::volume::{BlockVolume, Extent, ReadChunk, VolumeResult};

/// 1 MiB that reads as zeroes; nothing here gets as far as a request.
struct Blank;

impl BlockVolume for Blank {
    fn size(&self) -> u64 {
        1 << 20
    }
    async fn read(&self, _: u64, len: u32) -> VolumeResult<Vec<ReadChunk>> {
        Ok(vec![ReadChunk::Zeroes(len.into())])
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> VolumeResult<()> {
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool, _: bool) -> VolumeResult<()> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u64, _: bool) -> VolumeResult<()> {
        Ok(())
    }
    async fn flush(&self) -> VolumeResult<()> {
        Ok(())
    }
    async fn block_status(&self, _: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            hole: true,
            zero: true,
        }])
    }
}

fn certtool(args: &[&str]) {
    let out = std::process::Command::new("certtool")
        .args(args)
        .output()
        .expect("certtool (package gnutls-bin; scripts/test installs it)");
    assert!(
        out.status.success(),
        "certtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for localhost in `dir`, in the `--tls-certificates` layout.
fn make_certificates(dir: &Path) {
    let p = |f: &str| dir.join(f).display().to_string();
    std::fs::write(p("ca.tmpl"), "cn = \"test CA\"\nca\ncert_signing_key\n").unwrap();
    std::fs::write(
        p("server.tmpl"),
        "cn = \"localhost\"\ndns_name = \"localhost\"\ntls_www_server\nsigning_key\n\
         encryption_key\n",
    )
    .unwrap();
    certtool(&[
        "--generate-privkey",
        "--key-type=ecdsa",
        "--outfile",
        &p("ca-key.pem"),
    ]);
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        &p("ca-key.pem"),
        "--template",
        &p("ca.tmpl"),
        "--outfile",
        &p(CA_CERT),
    ]);
    certtool(&[
        "--generate-privkey",
        "--key-type=ecdsa",
        "--outfile",
        &p(SERVER_KEY),
    ]);
    certtool(&[
        "--generate-certificate",
        "--load-privkey",
        &p(SERVER_KEY),
        "--load-ca-certificate",
        &p(CA_CERT),
        "--load-ca-privkey",
        &p("ca-key.pem"),
        "--template",
        &p("server.tmpl"),
        "--outfile",
        &p(SERVER_CERT),
    ]);
}

/// What one negotiation ended with: the stream was TLS, structured replies were agreed.
type Ended = Result<Option<(bool, bool)>, String>;

struct Harness {
    _dir: tempfile::TempDir,
    connector: tokio_rustls::TlsConnector,
    client: TcpStream,
    server: tokio::task::JoinHandle<Ended>,
}

/// Certificates, a server that negotiates one connection in `mode`, and a client that has
/// read the greeting and sent its flags.
async fn harness(mode: TlsMode) -> Harness {
    harness_with(mode, rustls::DEFAULT_VERSIONS).await
}

/// [`harness`] with a client that offers only `versions`.
async fn harness_with(
    mode: TlsMode,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let tls = Tls::load(mode, dir.path(), false).expect("certtool's certificates load");
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.path().join(CA_CERT)).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut exports = Exports::new();
        exports.add("disk", Arc::new(Blank));
        let token = CancellationToken::new();
        match negotiate(Plain::Tcp(socket), &exports, &token, &tls).await {
            Ok(Some((stream, neg))) => Ok(Some((stream.is_tls(), neg.structured))),
            Ok(None) => Ok(None),
            Err(e @ HandshakeError::Tls(_)) => Err(e.to_string()),
            Err(e) => Err(format!("not a TLS failure: {e}")),
        }
    });
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 18];
    client.read_exact(&mut greeting).await.unwrap();
    client
        .write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    Harness {
        _dir: dir,
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        client,
        server,
    }
}

fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Sends an option and returns the type of the last reply to it (the ACK or error).
async fn ask<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) -> u32 {
    s.write_all(&option_bytes(option, data)).await.unwrap();
    s.flush().await.unwrap();
    loop {
        assert_eq!(s.read_u64().await.unwrap(), REPLY_OPT_MAGIC);
        assert_eq!(s.read_u32().await.unwrap(), option);
        let kind = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.unwrap();
        if kind != REP_INFO && kind != REP_META_CONTEXT && kind != REP_SERVER {
            return kind;
        }
    }
}

fn go_request(name: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b
}

fn meta_request(name: &str, query: &str) -> Vec<u8> {
    let mut b = go_request(name);
    b.truncate(b.len() - 2);
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&(query.len() as u32).to_be_bytes());
    b.extend_from_slice(query.as_bytes());
    b
}

async fn finished(server: tokio::task::JoinHandle<Ended>) -> Ended {
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the negotiation did not end")
        .unwrap()
}

#[tokio::test]
async fn starttls_forgets_what_was_negotiated_in_plaintext_and_cannot_be_repeated() {
    let Harness {
        _dir,
        connector,
        mut client,
        server,
    } = harness(TlsMode::On).await;
    assert_eq!(ask(&mut client, OPT_STRUCTURED_REPLY, &[]).await, REP_ACK);
    assert_eq!(ask(&mut client, OPT_STARTTLS, &[1]).await, REP_ERR_INVALID);
    assert_eq!(ask(&mut client, OPT_STARTTLS, &[]).await, REP_ACK);
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, client)
        .await
        .expect("TLS handshake");
    // Structured replies were agreed in plaintext: inside TLS they are not any more.
    let meta = meta_request("disk", BASE_ALLOCATION);
    assert_eq!(
        ask(&mut tls, OPT_SET_META_CONTEXT, &meta).await,
        REP_ERR_INVALID
    );
    // No second upgrade (and so no way back to plaintext).
    assert_eq!(ask(&mut tls, OPT_STARTTLS, &[]).await, REP_ERR_INVALID);
    assert_eq!(ask(&mut tls, OPT_STRUCTURED_REPLY, &[]).await, REP_ACK);
    assert_eq!(ask(&mut tls, OPT_GO, &go_request("disk")).await, REP_ACK);
    assert_eq!(finished(server).await, Ok(Some((true, true))));
}

#[tokio::test]
async fn no_plaintext_byte_before_starttls_is_processed_after_it() {
    let Harness {
        _dir,
        mut client,
        server,
        ..
    } = harness(TlsMode::Require).await;
    // STARTTLS and a plaintext GO in one write: a server that had read ahead would hold
    // the GO in a buffer and could answer it inside TLS.
    let mut wire = option_bytes(OPT_STARTTLS, &[]);
    wire.extend_from_slice(&option_bytes(OPT_GO, &go_request("disk")));
    client.write_all(&wire).await.unwrap();
    let mut ack = [0u8; 20];
    client.read_exact(&mut ack).await.unwrap();
    assert_eq!(u32::from_be_bytes(ack[12..16].try_into().unwrap()), REP_ACK);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut rest)).await;
    let magic = REPLY_OPT_MAGIC.to_be_bytes();
    assert!(
        !rest.windows(8).any(|w| w == magic),
        "the plaintext GO was answered: {rest:?}"
    );
    let ended = finished(server).await;
    assert!(
        matches!(&ended, Err(e) if e.starts_with("TLS handshake failed")),
        "{ended:?}"
    );
}

#[tokio::test]
async fn tls_require_refuses_every_option_but_starttls_and_abort() {
    let Harness {
        _dir,
        mut client,
        server,
        ..
    } = harness(TlsMode::Require).await;
    assert_eq!(ask(&mut client, OPT_LIST, &[]).await, REP_ERR_TLS_REQD);
    assert_eq!(
        ask(&mut client, OPT_STRUCTURED_REPLY, &[]).await,
        REP_ERR_TLS_REQD
    );
    let info = go_request("disk");
    assert_eq!(ask(&mut client, OPT_INFO, &info).await, REP_ERR_TLS_REQD);
    assert_eq!(ask(&mut client, OPT_GO, &info).await, REP_ERR_TLS_REQD);
    assert_eq!(ask(&mut client, 11, &[]).await, REP_ERR_TLS_REQD);
    assert_eq!(ask(&mut client, OPT_ABORT, &[]).await, REP_ACK);
    assert_eq!(finished(server).await, Ok(None));
}

#[tokio::test]
async fn tls_require_hangs_up_on_export_name_before_starttls() {
    let Harness {
        _dir,
        mut client,
        server,
        ..
    } = harness(TlsMode::Require).await;
    client
        .write_all(&option_bytes(OPT_EXPORT_NAME, b"disk"))
        .await
        .unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "EXPORT_NAME was answered: {rest:?}");
    let ended = finished(server).await;
    assert!(
        matches!(&ended, Err(e) if e.contains("EXPORT_NAME before STARTTLS")),
        "{ended:?}"
    );
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_both_served() {
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let Harness {
            _dir,
            connector,
            mut client,
            server,
        } = harness_with(TlsMode::Require, &[version]).await;
        assert_eq!(ask(&mut client, OPT_STARTTLS, &[]).await, REP_ACK);
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector
            .connect(name, client)
            .await
            .expect("TLS handshake");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
        assert_eq!(ask(&mut tls, OPT_GO, &go_request("disk")).await, REP_ACK);
        assert_eq!(finished(server).await, Ok(Some((true, false))));
    }
}
