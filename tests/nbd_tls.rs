//! NBD over TLS (`--tls`, `--tls-certificates`, `--tls-verify-peer`) with real clients:
//! libnbd's tools, qemu and fio over `nbds://`, against certificates made by GnuTLS's
//! `certtool`, so nothing here depends on blockrep's own certificate code.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::certtool::{run_certtool, Pki};
use common::*;

/// `nbds://127.0.0.1:PORT/blockrep?tls-certificates=DIR`.
fn nbds(srv: &Served, client_dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/blockrep?tls-certificates={}",
        srv.port,
        client_dir.display()
    )
}

fn both(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// A store and a CA with a server directory and a client directory (with a certificate).
struct Setup {
    _tmp: tempfile::TempDir,
    tmp: PathBuf,
    store: PathBuf,
    pki: Pki,
    server: PathBuf,
    client: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().to_path_buf();
    let store = create_store(&path, "store", 64 * MIB);
    let pki = Pki::new(&path, "ca");
    let server = pki.server_dir(&path, "server");
    let client = pki.client_dir(&path, "client", true);
    Setup {
        _tmp: tmp,
        tmp: path,
        store,
        pki,
        server,
        client,
    }
}

/// `blockrep serve` with `--tls MODE --tls-certificates DIR` and `extra`.
fn serve_tls(s: &Setup, mode: &str, extra: &[&str]) -> Served {
    let dir = s.server.to_str().expect("utf-8 path");
    let mut args = vec!["--metrics", "off", "--tls", mode, "--tls-certificates", dir];
    args.extend_from_slice(extra);
    serve(&s.store, &args)
}

fn nbdinfo(uri: &str) -> Output {
    require("nbdinfo");
    run(timed(60, "nbdinfo").arg(uri).env("LIBNBD_DEBUG", "1"))
}

#[test]
fn nbdinfo_over_nbds_sees_the_export_under_tls_require() {
    let s = setup();
    let srv = serve_tls(&s, "require", &[]);
    assert!(srv.banner.contains("nbds://"), "banner: {}", srv.banner);
    let out = nbdinfo(&nbds(&srv, &s.client));
    let t = both(&out);
    assert!(out.status.success(), "nbdinfo over nbds:// failed:\n{t}");
    assert!(t.contains("with TLS"), "nbdinfo did not report TLS:\n{t}");
    assert!(t.contains("export-size: 67108864"), "{t}");
}

/// libnbd reports a TLS_REQD refusal as "Operation not supported"; its debug log carries
/// the server's message, which says TLS is required.
fn assert_tls_required(out: &Output, what: &str) {
    let t = both(out);
    assert!(!out.status.success(), "{what} succeeded without TLS:\n{t}");
    assert!(
        t.contains("requires TLS"),
        "{what} did not say TLS is required:\n{t}"
    );
}

/// The option reply type the server gives a plaintext `NBD_OPT_LIST`.
fn plaintext_list_reply(port: u16) -> u32 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let mut msg = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&3u32.to_be_bytes()); // NBD_OPT_LIST
    msg.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&msg).expect("send LIST");
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("option reply");
    assert_eq!(u32::from_be_bytes(reply[8..12].try_into().unwrap()), 3);
    u32::from_be_bytes(reply[12..16].try_into().unwrap())
}

const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

#[test]
fn a_plaintext_client_is_refused_with_tls_reqd() {
    let s = setup();
    let srv = serve_tls(&s, "require", &[]);
    assert_tls_required(&nbdinfo(&srv.export_uri("blockrep")), "plaintext nbdinfo");
    assert_eq!(plaintext_list_reply(srv.port), REP_ERR_TLS_REQD);
    // The refusal is for that client only: TLS clients still get in.
    assert!(nbdinfo(&nbds(&srv, &s.client)).status.success());
}

#[test]
fn tls_on_serves_plaintext_and_tls_clients() {
    let s = setup();
    let srv = serve_tls(&s, "on", &[]);
    let plain = nbdinfo(&srv.export_uri("blockrep"));
    assert!(plain.status.success(), "plaintext: {}", both(&plain));
    assert!(both(&plain).contains("without TLS"), "{}", both(&plain));
    let tls = nbdinfo(&nbds(&srv, &s.client));
    assert!(tls.status.success(), "TLS: {}", both(&tls));
    assert!(both(&tls).contains("with TLS"), "{}", both(&tls));
}

#[test]
fn verify_peer_accepts_only_clients_with_a_certificate_from_the_ca() {
    let s = setup();
    let srv = serve_tls(&s, "require", &["--tls-verify-peer"]);
    let ok = nbdinfo(&nbds(&srv, &s.client));
    assert!(ok.status.success(), "client of the right CA: {}", both(&ok));
    let no_cert = s.pki.client_dir(&s.tmp, "no-cert", false);
    let out = nbdinfo(&nbds(&srv, &no_cert));
    assert!(
        !out.status.success(),
        "a client without a certificate got in:\n{}",
        both(&out)
    );
    // A certificate from another CA, in a directory that still trusts our server.
    let other = Pki::new(&s.tmp, "other-ca");
    let stranger = other.client_dir(&s.tmp, "stranger", true);
    std::fs::copy(s.pki.ca_cert(), stranger.join("ca-cert.pem")).expect("copy CA");
    let out = nbdinfo(&nbds(&srv, &stranger));
    assert!(
        !out.status.success(),
        "a client of another CA got in:\n{}",
        both(&out)
    );
    let log = srv.log();
    assert!(log.contains("TLS handshake failed"), "server log:\n{log}");
}

#[test]
fn nbdcopy_qemu_io_and_fio_move_data_over_tls() {
    require("nbdcopy");
    require("qemu-io");
    require("fio");
    let s = setup();
    let srv = serve_tls(&s, "require", &[]);
    let uri = nbds(&srv, &s.client);
    let image = s.tmp.join("in.img");
    std::fs::write(&image, random_bytes(15, 8 << 20)).expect("image");
    run_ok(timed(120, "nbdcopy").arg(&image).arg(&uri));
    let copy = s.tmp.join("out.img");
    run_ok(timed(120, "nbdcopy").arg(&uri).arg(&copy));
    let got = std::fs::read(&copy).expect("copy");
    assert_eq!(got.len() as u64, 64 * MIB);
    assert!(
        got[..8 << 20] == random_bytes(15, 8 << 20)[..],
        "nbdcopy round trip differs"
    );
    assert!(
        got[8 << 20..].iter().all(|b| *b == 0),
        "past the image is not zero"
    );
    // qemu with its own X.509 credentials object (same directory layout as libnbd's).
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        s.client.display()
    );
    let image_opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export=blockrep,tls-creds=tls0",
        srv.port
    );
    let out = run_ok(
        timed(120, "qemu-io")
            .args(["--object", &object, "--image-opts", &image_opts])
            .args(["-c", "write -P 0x5a 16M 1M", "-c", "read -P 0x5a 16M 1M"]),
    );
    assert!(
        !out.contains("fail") && !out.contains("rror"),
        "qemu-io: {out}"
    );
    // fio's nbd engine lets libnbd read no file named in a URI, so the CA goes where
    // libnbd looks without one: $HOME/.pki/libnbd (libnbd 1.14 presents no client
    // certificate from there, hence a server without --tls-verify-peer here).
    let home = s.tmp.join("home");
    let pki_dir = home.join(".pki").join("libnbd");
    std::fs::create_dir_all(&pki_dir).expect("~/.pki/libnbd");
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(s.client.join(f), pki_dir.join(f)).expect("copy credentials");
    }
    let fio = run_ok(
        timed(120, "fio")
            .current_dir(&s.tmp)
            .env("HOME", &home)
            .args(["--name=tls", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"])
            .args([
                "--iodepth=8",
                "--offset=32M",
                "--size=8M",
                "--verify=crc32c",
            ])
            .args(["--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"])
            .args(["--randseed=7", "--minimal"])
            .arg(format!("--uri=nbds://127.0.0.1:{}/blockrep", srv.port)),
    );
    let terse: Vec<&str> = fio.lines().filter(|l| l.starts_with("3;")).collect();
    assert!(!terse.is_empty(), "no terse output from fio:\n{fio}");
    for l in terse {
        assert_eq!(
            l.split(';').nth(4),
            Some("0"),
            "fio reported an error:\n{fio}"
        );
    }
}

/// `blockrep serve` with `args` must fail at start, saying `needle` on stderr.
fn refused_at_start(s: &Setup, args: &[&str], needle: &str) {
    let mut cmd = blockrep_timed(60);
    cmd.arg("serve")
        .arg(&s.store)
        .args(["--metrics", "off", "--nbd", "127.0.0.1:0"]);
    let out = run(cmd.args(args));
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "serve {args:?} started:\n{}",
        both(&out)
    );
    assert!(
        err.contains(needle),
        "serve {args:?}: no {needle:?} in:\n{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line:\n{err}");
}

#[test]
fn tls_psk_is_refused_and_says_x509_is_supported() {
    let s = setup();
    let psk = s.tmp.join("keys.psk");
    std::fs::write(&psk, "client:0123456789abcdef\n").expect("psk file");
    let psk = psk.to_str().expect("utf-8").to_string();
    refused_at_start(&s, &["--tls", "require", "--tls-psk", &psk], "X.509 is");
    refused_at_start(
        &s,
        &["--tls", "require", "--tls-psk", &psk],
        "PSK is not supported",
    );
}

#[test]
fn bad_certificate_directories_are_refused_naming_the_file() {
    let s = setup();
    let dir = |name: &str| {
        let d = s.tmp.join(name);
        std::fs::create_dir_all(&d).expect("dir");
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(s.server.join(f), d.join(f)).expect("copy");
        }
        d
    };
    let flags = |d: &Path| -> Vec<String> {
        vec![
            "--tls".into(),
            "require".into(),
            "--tls-certificates".into(),
            d.display().to_string(),
        ]
    };
    let check = |d: &Path, file: &str, why: &str| {
        let f = flags(d);
        let args: Vec<&str> = f.iter().map(String::as_str).collect();
        refused_at_start(&s, &args, &d.join(file).display().to_string());
        refused_at_start(&s, &args, why);
    };
    let missing = dir("missing");
    std::fs::remove_file(missing.join("server-key.pem")).expect("rm");
    check(&missing, "server-key.pem", "missing");
    let garbage = dir("garbage");
    std::fs::write(garbage.join("server-cert.pem"), "not a certificate\n").expect("write");
    check(&garbage, "server-cert.pem", "no PEM certificate");
    // A key issued for another certificate.
    let mismatched = dir("mismatched");
    let client_key = s.client.join("client-key.pem");
    std::fs::copy(client_key, mismatched.join("server-key.pem")).expect("copy");
    check(&mismatched, "server-key.pem", "does not match");
    let unset = ["--tls", "require"];
    refused_at_start(&s, &unset, "needs --tls-certificates");
}

#[test]
fn config_keys_turn_tls_on_and_tls_psk_there_is_refused_too() {
    let s = setup();
    let config = s.tmp.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "tls = \"require\"\ntls-certificates = \"{}\"\ntls-verify-peer = true\n",
            s.server.display()
        ),
    )
    .expect("config");
    let config_arg = config.to_str().expect("utf-8").to_string();
    let srv = serve(&s.store, &["--metrics", "off", "--config", &config_arg]);
    assert!(nbdinfo(&nbds(&srv, &s.client)).status.success());
    let no_cert = s.pki.client_dir(&s.tmp, "no-cert", false);
    assert!(!nbdinfo(&nbds(&srv, &no_cert)).status.success());
    assert_tls_required(&nbdinfo(&srv.export_uri("blockrep")), "plaintext nbdinfo");
    drop(srv);
    std::fs::write(&config, "tls = \"require\"\ntls-psk = \"/etc/keys.psk\"\n").expect("config");
    refused_at_start(&s, &["--config", &config_arg], "PSK is not supported");
}

#[test]
fn up_serves_its_volume_over_tls_with_the_same_flags() {
    let s = setup();
    let port = free_port();
    let data = s.tmp.join("up-data");
    let args = [
        "up".into(),
        "--dir".into(),
        data.clone().into_os_string(),
        "--size".into(),
        "64MiB".into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
        "--tls".into(),
        "require".into(),
        "--tls-certificates".into(),
        s.server.clone().into_os_string(),
    ];
    // Its first line says it created the volume; serving shows as the port accepting.
    let mut up = Node::builder("up", &data, port, args.to_vec())
        .ready(Ready::Started)
        .wait_for_port()
        .start();
    let out = nbdinfo(&nbds(&up, &s.client));
    assert!(
        out.status.success(),
        "nbdinfo over nbds:// to up:\n{}",
        both(&out)
    );
    assert_tls_required(
        &nbdinfo(&up.export_uri("blockrep")),
        "plaintext nbdinfo to up",
    );
    up.stop_ok();
}

#[test]
fn a_client_certificate_revoked_in_ca_crl_is_refused() {
    let s = setup();
    let revoked = s.pki.client_dir(&s.tmp, "revoked", true);
    let template = s
        .pki
        .template("crl", "crl_next_update = 30\ncrl_number = 1\n");
    run_certtool(&[
        "--generate-crl".as_ref(),
        "--load-ca-privkey".as_ref(),
        s.pki.dir.join("ca-key.pem").as_os_str(),
        "--load-ca-certificate".as_ref(),
        s.pki.ca_cert().as_os_str(),
        "--load-certificate".as_ref(),
        revoked.join("client-cert.pem").as_os_str(),
        "--template".as_ref(),
        template.as_os_str(),
        "--outfile".as_ref(),
        s.server.join("ca-crl.pem").as_os_str(),
    ]);
    let srv = serve_tls(&s, "require", &["--tls-verify-peer"]);
    let out = nbdinfo(&nbds(&srv, &revoked));
    assert!(
        !out.status.success(),
        "a revoked client got in:\n{}",
        both(&out)
    );
    let ok = nbdinfo(&nbds(&srv, &s.client));
    assert!(ok.status.success(), "a client not revoked: {}", both(&ok));
    let log = srv.log();
    assert!(log.contains("Revoked"), "not refused as revoked:\n{log}");
}
