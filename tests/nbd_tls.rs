//! NBD over TLS (`--tls`, `--tls-certificates`, `--tls-verify-peer`) with real clients:
//! libnbd's tools, qemu and fio over `nbds://`, against certificates made by GnuTLS's
//! `certtool`, so nothing here depends on blockrep's own certificate code.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// A certificate authority made with certtool, and the directories it issues.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A new CA in `parent/name` (`ca-key.pem`, `ca-cert.pem`).
    fn new(parent: &Path, name: &str) -> Pki {
        require("certtool");
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).expect("CA directory");
        let pki = Pki { dir };
        let key = pki.dir.join("ca-key.pem");
        certtool(&["--generate-privkey", "--outfile"], &key);
        let template = pki.template(
            "ca",
            &format!("cn = \"{name}\"\nca\ncert_signing_key\nexpiration_days = 30\n"),
        );
        run_certtool(&[
            "--generate-self-signed".as_ref(),
            "--load-privkey".as_ref(),
            key.as_os_str(),
            "--template".as_ref(),
            template.as_os_str(),
            "--outfile".as_ref(),
            pki.ca_cert().as_os_str(),
        ]);
        pki
    }

    fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    fn template(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.tmpl"));
        std::fs::write(&path, text).expect("certtool template");
        path
    }

    /// Issues `out/PREFIX-key.pem` and `out/PREFIX-cert.pem` from `template`.
    fn issue(&self, out: &Path, prefix: &str, key_type: &str, template: &str) {
        let key = out.join(format!("{prefix}-key.pem"));
        let cert = out.join(format!("{prefix}-cert.pem"));
        certtool(
            &[
                "--generate-privkey",
                &format!("--key-type={key_type}"),
                "--outfile",
            ],
            &key,
        );
        let template = self.template(prefix, template);
        run_certtool(&[
            "--generate-certificate".as_ref(),
            "--load-privkey".as_ref(),
            key.as_os_str(),
            "--load-ca-certificate".as_ref(),
            self.ca_cert().as_os_str(),
            "--load-ca-privkey".as_ref(),
            self.dir.join("ca-key.pem").as_os_str(),
            "--template".as_ref(),
            template.as_os_str(),
            "--outfile".as_ref(),
            cert.as_os_str(),
        ]);
    }

    /// A `--tls-certificates` directory: this CA, a server certificate for 127.0.0.1 and
    /// localhost (RSA, certtool's default kind of key).
    fn server_dir(&self, parent: &Path, name: &str) -> PathBuf {
        let out = self.copy_ca(parent, name);
        self.issue(
            &out,
            "server",
            "rsa",
            "organization = \"blockrep tests\"\ncn = \"localhost\"\ndns_name = \"localhost\"\n\
             ip_address = \"127.0.0.1\"\ntls_www_server\nencryption_key\nsigning_key\n\
             expiration_days = 30\n",
        );
        out
    }

    /// A libnbd `tls-certificates=` directory: `ca-cert.pem` (to check the server with) and,
    /// if `with_cert`, a client certificate from this CA (ECDSA).
    fn client_dir(&self, parent: &Path, name: &str, with_cert: bool) -> PathBuf {
        let out = self.copy_ca(parent, name);
        if with_cert {
            self.issue(
                &out,
                "client",
                "ecdsa",
                &format!("cn = \"{name}\"\ntls_www_client\nsigning_key\nexpiration_days = 30\n"),
            );
        }
        out
    }

    fn copy_ca(&self, parent: &Path, name: &str) -> PathBuf {
        let out = parent.join(name);
        std::fs::create_dir_all(&out).expect("certificate directory");
        std::fs::copy(self.ca_cert(), out.join("ca-cert.pem")).expect("copy ca-cert.pem");
        out
    }
}

fn certtool(args: &[&str], out: &Path) {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    all.push(out.as_os_str());
    run_certtool(&all);
}

fn run_certtool(args: &[&std::ffi::OsStr]) {
    run_ok(timed(120, "certtool").args(args));
}

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
#[allow(dead_code)]
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
