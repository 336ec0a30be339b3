//! `blockrep certs`: the CA and the certificates it issues, checked by the tools the rest of
//! the world uses: OpenSSL reads and verifies them, GnuTLS (what libnbd and qemu use) verifies
//! them and completes real mutual-TLS handshakes with them against an OpenSSL server, and
//! nbdkit and libnbd (`nbdinfo`) serve and read NBD over TLS from the directories as issued.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;

/// `blockrep certs ARGS...`, bounded.
fn certs(args: &[&str], dir: &Path) -> Output {
    run(blockrep_timed(60).current_dir(dir).arg("certs").args(args))
}

fn certs_ok(args: &[&str], dir: &Path) -> String {
    let out = certs(args, dir);
    assert!(out.status.success(), "certs {args:?}: {}", describe(&out));
    text(&out.stdout)
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `openssl x509 -in CERT -noout ARGS`.
fn x509(cert: &Path, args: &[&str]) -> String {
    require("openssl");
    run_ok(
        timed(30, "openssl")
            .args(["x509", "-noout", "-in"])
            .arg(cert)
            .args(args),
    )
}

/// `openssl verify -CAfile CA [-purpose P] CERT`.
fn openssl_verify(ca: &Path, cert: &Path, purpose: Option<&str>) -> Output {
    let mut cmd = timed(30, "openssl");
    cmd.arg("verify").arg("-CAfile").arg(ca);
    if let Some(p) = purpose {
        cmd.args(["-purpose", p]);
    }
    run(cmd.arg(cert))
}

/// `certtool --verify`, GnuTLS's chain check.
fn certtool_verify(ca: &Path, cert: &Path) -> Output {
    require("certtool");
    run(timed(30, "certtool")
        .arg("--verify")
        .arg("--load-ca-certificate")
        .arg(ca)
        .arg("--infile")
        .arg(cert))
}

/// A CA in `tmp/NAME`.
fn init(tmp: &Path, name: &str) -> PathBuf {
    certs_ok(&["init", name], tmp);
    tmp.join(name)
}

/// Issues `--KIND NAME --out OUT` (plus `extra`) from the CA `ca`; returns OUT.
fn issue(tmp: &Path, ca: &str, kind: &str, name: &str, out: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["issue", ca, kind, name, "--out", out];
    args.extend_from_slice(extra);
    certs_ok(&args, tmp);
    tmp.join(out)
}

#[test]
fn init_and_issue_write_each_layout_with_keys_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ca = init(t, "ca");
    assert_eq!(mode(&ca), 0o700, "the CA directory holds its key");
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&ca.join("ca-cert.pem")), 0o644);
    let ca_cert = read(&ca.join("ca-cert.pem"));
    for (kind, stem) in [
        ("--node", "node"),
        ("--server", "server"),
        ("--client", "client"),
    ] {
        // OUT nested two levels deep and missing: created.
        let out = issue(t, "ca", kind, "n1", &format!("out/{stem}"), &[]);
        let key = out.join(format!("{stem}-key.pem"));
        let cert = out.join(format!("{stem}-cert.pem"));
        assert_eq!(mode(&key), 0o600, "{}", key.display());
        assert_eq!(mode(&cert), 0o644, "{}", cert.display());
        assert_eq!(mode(&out.join("ca-cert.pem")), 0o644);
        assert_eq!(read(&out.join("ca-cert.pem")), ca_cert);
        assert!(read(&key).contains("PRIVATE KEY"));
        let mut names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want = vec![
            "ca-cert.pem".to_string(),
            format!("{stem}-cert.pem"),
            format!("{stem}-key.pem"),
        ];
        want.sort();
        assert_eq!(
            names, want,
            "only the layout's files (no temporaries) in {stem}"
        );
    }
}

#[test]
fn keys_are_created_0600_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // umask 0 would leave a key created 0666 and chmodded later readable for a moment;
    // created with 0600 it never is. Certificates still come out 0644 under umask 077.
    for umask in ["000", "077"] {
        let out = run(timed(60, "sh").current_dir(t).arg("-c").arg(format!(
            "umask {umask} && {} certs init ca-{umask} && {} certs issue ca-{umask} --node n --out o-{umask}",
            env!("CARGO_BIN_EXE_blockrep"),
            env!("CARGO_BIN_EXE_blockrep")
        )));
        assert!(out.status.success(), "{}", describe(&out));
        let o = t.join(format!("o-{umask}"));
        assert_eq!(mode(&t.join(format!("ca-{umask}/ca-key.pem"))), 0o600);
        assert_eq!(mode(&o.join("node-key.pem")), 0o600);
        assert_eq!(mode(&o.join("node-cert.pem")), 0o644);
    }
}

#[test]
fn certificates_carry_their_names_usages_and_the_ca_as_issuer() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ca = init(t, "ca");
    let ca_text = x509(&ca.join("ca-cert.pem"), &["-text"]);
    assert!(ca_text.contains("CA:TRUE"), "{ca_text}");
    assert!(ca_text.contains("Certificate Sign"), "{ca_text}");
    let ca_subject = x509(
        &ca.join("ca-cert.pem"),
        &["-subject", "-nameopt", "RFC2253"],
    );
    let ca_subject = ca_subject.trim().trim_start_matches("subject=");

    let node = issue(
        t,
        "ca",
        "--node",
        "r1",
        "node",
        &["--san", "10.0.0.7,db.example,::1"],
    );
    let text = x509(&node.join("node-cert.pem"), &["-text"]);
    for want in [
        "DNS:r1",
        "IP Address:10.0.0.7",
        "DNS:db.example",
        "IP Address:0:0:0:0:0:0:0:1",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "CA:FALSE",
        "CN = r1",
    ] {
        assert!(
            text.contains(want),
            "node certificate lacks {want:?}:\n{text}"
        );
    }

    let server = issue(t, "ca", "--server", "nbd1", "server", &[]);
    let text = x509(&server.join("server-cert.pem"), &["-text"]);
    for want in ["DNS:nbd1", "IP Address:127.0.0.1", "DNS:localhost"] {
        assert!(
            text.contains(want),
            "server certificate lacks {want:?}:\n{text}"
        );
    }
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    assert!(!text.contains("TLS Web Client Authentication"), "{text}");

    let given = issue(
        t,
        "ca",
        "--server",
        "nbd1",
        "given",
        &["--san", "nbd.example"],
    );
    let text = x509(&given.join("server-cert.pem"), &["-text"]);
    assert!(text.contains("DNS:nbd1, DNS:nbd.example"), "{text}");
    assert!(
        !text.contains("127.0.0.1"),
        "given SANs replace the defaults:\n{text}"
    );

    let client = issue(t, "ca", "--client", "alice", "client", &[]);
    let text = x509(&client.join("client-cert.pem"), &["-text"]);
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");

    for cert in [
        node.join("node-cert.pem"),
        server.join("server-cert.pem"),
        client.join("client-cert.pem"),
    ] {
        let issuer = x509(&cert, &["-issuer", "-nameopt", "RFC2253"]);
        assert_eq!(issuer.trim().trim_start_matches("issuer="), ca_subject);
    }
}

#[test]
fn the_chain_verifies_against_its_ca_and_no_other() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ca = init(t, "ca").join("ca-cert.pem");
    let other = init(t, "other").join("ca-cert.pem");
    let node = issue(t, "ca", "--node", "r1", "node", &[]).join("node-cert.pem");
    let server = issue(t, "ca", "--server", "s", "server", &[]).join("server-cert.pem");
    let client = issue(t, "ca", "--client", "c", "client", &[]).join("client-cert.pem");
    for cert in [&node, &server, &client] {
        let ok = openssl_verify(&ca, cert, None);
        assert!(ok.status.success(), "{}", describe(&ok));
        let ok = certtool_verify(&ca, cert);
        assert!(ok.status.success(), "{}", describe(&ok));
        assert!(text(&ok.stdout).contains("Verified"), "{}", describe(&ok));
        let bad = openssl_verify(&other, cert, None);
        assert!(
            !bad.status.success(),
            "another CA accepted: {}",
            describe(&bad)
        );
        let bad = certtool_verify(&other, cert);
        assert!(
            !bad.status.success() && !text(&bad.stdout).contains("Verified."),
            "another CA accepted by certtool: {}",
            describe(&bad)
        );
    }
    // The usages: a node is both ends, a server only serves, a client only connects.
    for (cert, purpose, ok) in [
        (&node, "sslserver", true),
        (&node, "sslclient", true),
        (&server, "sslserver", true),
        (&server, "sslclient", false),
        (&client, "sslclient", true),
        (&client, "sslserver", false),
    ] {
        let out = openssl_verify(&ca, cert, Some(purpose));
        assert_eq!(out.status.success(), ok, "{purpose}: {}", describe(&out));
    }
}

#[test]
fn a_ca_is_not_replaced_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ca = init(t, "ca");
    let cert = read(&ca.join("ca-cert.pem"));
    let key = read(&ca.join("ca-key.pem"));
    let out = certs(&["init", "ca"], t);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("already holds a CA") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(read(&ca.join("ca-cert.pem")), cert);
    assert_eq!(read(&ca.join("ca-key.pem")), key);
    // A CA directory with only a key left in it is not overwritten either.
    fs::remove_file(ca.join("ca-cert.pem")).unwrap();
    assert!(!certs(&["init", "ca"], t).status.success());
    assert_eq!(read(&ca.join("ca-key.pem")), key);

    certs_ok(&["init", "ca", "--force"], t);
    assert_ne!(read(&ca.join("ca-key.pem")), key);
    assert_ne!(read(&ca.join("ca-cert.pem")), cert);
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
}

#[test]
fn bad_input_is_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let one_line = |args: &[&str], want: &str| {
        let out = certs(args, t);
        assert!(!out.status.success(), "{args:?}: {}", describe(&out));
        let err = text(&out.stderr);
        assert!(err.contains(want), "{args:?}: wanted {want:?} in {err}");
        err
    };
    let err = one_line(
        &["issue", "nope", "--node", "n", "--out", "o"],
        "no CA in nope",
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!t.join("o").exists(), "nothing written without a CA");
    init(t, "ca");
    let err = one_line(
        &["issue", "ca", "--node", "bad name", "--out", "o"],
        "invalid name",
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    one_line(
        &["issue", "ca", "--node", "n", "--san", "a_b", "--out", "o"],
        "invalid name \"a_b\"",
    );
    one_line(
        &["issue", "ca", "--node", "n", "--client", "c", "--out", "o"],
        "cannot be used with",
    );
    one_line(&["issue", "ca", "--out", "o"], "--node");
    // A key that is not the CA's own is caught before it signs anything.
    init(t, "other");
    fs::copy(t.join("other/ca-key.pem"), t.join("ca/ca-key.pem")).unwrap();
    let err = one_line(
        &["issue", "ca", "--node", "n", "--out", "o"],
        "is not the key of the CA certificate",
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// An OpenSSL TLS server with `dir`'s `stem` certificate that requires a client certificate
/// from `dir`'s CA and echoes each line reversed; stops with the test (and after a minute).
fn tls_server(tmp: &Path, dir: &Path, stem: &str) -> (KillOnDrop, u16) {
    require("openssl");
    let port = free_port();
    let log = tmp.join(format!("s_server-{port}.log"));
    let server = KillOnDrop::spawn_group(
        timed(60, "openssl")
            .arg("s_server")
            .arg("-accept")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.join(format!("{stem}-cert.pem")))
            .arg("-key")
            .arg(dir.join(format!("{stem}-key.pem")))
            .arg("-CAfile")
            .arg(dir.join("ca-cert.pem"))
            .args(["-Verify", "1", "-verify_return_error", "-rev"]),
        "openssl s_server",
        log.clone(),
    );
    let stdout = log.with_extension("stdout");
    wait_until(Duration::from_secs(30), "s_server listening", || {
        fs::read_to_string(&stdout).is_ok_and(|s| s.contains("ACCEPT"))
    });
    (server, port)
}

/// GnuTLS's client (libnbd's TLS library) sends "ping" with `client`'s `stem` certificate,
/// checking the server against `ca` and `hostname`; the reply is in stdout.
fn gnutls_client(port: u16, ca: &Path, client: Option<(&Path, &str)>, hostname: &str) -> Output {
    require("gnutls-cli");
    let mut cmd = timed(30, "sh");
    let mut line = format!(
        "echo ping | gnutls-cli --port {port} --x509cafile '{}' --verify-hostname {hostname}",
        ca.display()
    );
    if let Some((dir, stem)) = client {
        line += &format!(
            " --x509certfile '{}' --x509keyfile '{}'",
            dir.join(format!("{stem}-cert.pem")).display(),
            dir.join(format!("{stem}-key.pem")).display()
        );
    }
    run(cmd.arg("-c").arg(line + " 127.0.0.1"))
}

/// A server and a client certificate from the CA `ca`, and a client one from `other`.
struct Party {
    server: PathBuf,
    client: PathBuf,
    stranger: PathBuf,
}

fn party(t: &Path) -> Party {
    init(t, "ca");
    init(t, "other");
    Party {
        server: issue(t, "ca", "--server", "nbd1", "server", &[]),
        client: issue(t, "ca", "--client", "alice", "client", &[]),
        stranger: issue(t, "other", "--client", "alice", "stranger", &[]),
    }
}

#[test]
fn a_server_and_a_client_certificate_complete_a_mutual_tls_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let p = party(t);
    let (server, client, stranger) = (p.server, p.client, p.stranger);
    let (_s, port) = tls_server(t, &server, "server");
    let ca = client.join("ca-cert.pem");

    // The server's default SANs let a local client check it as localhost.
    let ok = gnutls_client(port, &ca, Some((&client, "client")), "localhost");
    assert!(ok.status.success(), "{}", describe(&ok));
    assert!(
        text(&ok.stdout).contains("gnip"),
        "no data came back: {}",
        describe(&ok)
    );

    let refused = gnutls_client(port, &ca, Some((&stranger, "client")), "localhost");
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        !text(&refused.stdout).contains("gnip"),
        "{}",
        describe(&refused)
    );
    let refused = gnutls_client(port, &ca, None, "localhost");
    assert!(!refused.status.success(), "{}", describe(&refused));
    // A server certificate is not a client certificate (no clientAuth usage).
    let refused = gnutls_client(port, &ca, Some((&server, "server")), "localhost");
    assert!(!refused.status.success(), "{}", describe(&refused));
    // The client checks the server's name: one it does not carry is refused.
    let wrong = gnutls_client(port, &ca, Some((&client, "client")), "elsewhere");
    assert!(!wrong.status.success(), "{}", describe(&wrong));
}

#[test]
fn node_certificates_authenticate_both_ends_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    init(t, "ca");
    let r1 = issue(t, "ca", "--node", "r1", "r1", &[]);
    let primary = issue(t, "ca", "--node", "primary", "primary", &[]);
    let (_s, port) = tls_server(t, &r1, "node");
    let ok = gnutls_client(
        port,
        &primary.join("ca-cert.pem"),
        Some((&primary, "node")),
        "r1",
    );
    assert!(ok.status.success(), "{}", describe(&ok));
    assert!(text(&ok.stdout).contains("gnip"), "{}", describe(&ok));
    // A primary expecting replica r2 finds r1's certificate and refuses it.
    let wrong = gnutls_client(
        port,
        &primary.join("ca-cert.pem"),
        Some((&primary, "node")),
        "r2",
    );
    assert!(!wrong.status.success(), "{}", describe(&wrong));
}

/// `nbdinfo` on `nbds://localhost:PORT/?tls-certificates=DIR`.
fn nbdinfo_tls(port: u16, dir: &Path) -> Output {
    require("nbdinfo");
    run(timed(30, "nbdinfo").arg(format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        dir.display()
    )))
}

#[test]
fn nbdkit_and_libnbd_take_the_directories_as_issued() {
    require("nbdkit");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let p = party(t);
    let (server, client, stranger) = (&p.server, &p.client, &p.stranger);
    // Trusts the right CA but presents another CA's client certificate.
    fs::copy(client.join("ca-cert.pem"), stranger.join("ca-cert.pem")).unwrap();
    let port = free_port();
    let _nbdkit = KillOnDrop::spawn_group(
        timed(60, "nbdkit")
            .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()])
            .arg("--tls=require")
            .arg(format!("--tls-certificates={}", server.display()))
            .args(["--tls-verify-peer", "memory", "1M"]),
        "nbdkit",
        t.join("nbdkit.log"),
    );
    wait_for_port(port);
    let ok = nbdinfo_tls(port, client);
    assert!(ok.status.success(), "{}", describe(&ok));
    assert!(text(&ok.stdout).contains("with TLS"), "{}", describe(&ok));
    let refused = nbdinfo_tls(port, stranger);
    assert!(!refused.status.success(), "{}", describe(&refused));
}
