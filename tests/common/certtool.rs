//! A certificate authority made with GnuTLS's `certtool`, and the directories it issues in
//! the layouts blockrep reads (`--tls-certificates`, libnbd's `tls-certificates=`,
//! `--peer-tls-dir`): certificates no code of blockrep's made.

use std::path::{Path, PathBuf};

use super::{require, run_ok, timed};

/// A certificate authority made with certtool, and the directories it issues.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A new CA in `parent/name` (`ca-key.pem`, `ca-cert.pem`).
    pub fn new(parent: &Path, name: &str) -> Pki {
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

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    pub fn template(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.tmpl"));
        std::fs::write(&path, text).expect("certtool template");
        path
    }

    /// Issues `out/PREFIX-key.pem` and `out/PREFIX-cert.pem` from `template`.
    pub fn issue(&self, out: &Path, prefix: &str, key_type: &str, template: &str) {
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
    pub fn server_dir(&self, parent: &Path, name: &str) -> PathBuf {
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
    /// if `with_cert`, a client certificate from this CA (RSA: qemu insists on the key
    /// encipherment usage, which certtool leaves out of ECDSA certificates).
    pub fn client_dir(&self, parent: &Path, name: &str, with_cert: bool) -> PathBuf {
        let out = self.copy_ca(parent, name);
        if with_cert {
            self.issue(
                &out,
                "client",
                "rsa",
                &format!(
                    "cn = \"{name}\"\ntls_www_client\nencryption_key\nsigning_key\n\
                     expiration_days = 30\n"
                ),
            );
        }
        out
    }

    pub fn copy_ca(&self, parent: &Path, name: &str) -> PathBuf {
        let out = parent.join(name);
        std::fs::create_dir_all(&out).expect("certificate directory");
        std::fs::copy(self.ca_cert(), out.join("ca-cert.pem")).expect("copy ca-cert.pem");
        out
    }
}

pub fn certtool(args: &[&str], out: &Path) {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    all.push(out.as_os_str());
    run_certtool(&all);
}

pub fn run_certtool(args: &[&std::ffi::OsStr]) {
    run_ok(timed(120, "certtool").args(args));
}

impl Pki {
    /// A `--peer-tls-dir` for node `name`: this CA and a node certificate for `name` (both
    /// TLS usages) with a `key_type` key. For `ecdsa`, keys are made until certtool writes
    /// one whose SEC1 scalar carries a leading zero (about half do), the shape ring refuses
    /// unless blockrep repairs it.
    pub fn node_dir(&self, parent: &Path, name: &str, key_type: &str) -> PathBuf {
        let out = self.copy_ca(parent, name);
        let template = format!(
            "cn = \"{name}\"\ndns_name = \"{name}\"\ntls_www_server\ntls_www_client\n\
             signing_key\nencryption_key\nexpiration_days = 30\n"
        );
        for _ in 0..32 {
            self.issue(&out, "node", key_type, &template);
            if key_type != "ecdsa" || padded_sec1(&out.join("node-key.pem")) {
                return out;
            }
        }
        panic!("certtool wrote no ECDSA key with a padded scalar in 32 tries");
    }
}

/// Whether the PEM SEC1 key in `path` holds a 33- or 49-byte scalar (a zero in front).
fn padded_sec1(path: &Path) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    match PrivateKeyDer::from_pem_file(path) {
        // SEQUENCE { INTEGER 1, OCTET STRING scalar, ... }: the scalar's length is the byte
        // after 02 01 01 04 (short-form lengths throughout for P-256 and P-384).
        Ok(PrivateKeyDer::Sec1(k)) => {
            let der = k.secret_sec1_der();
            let body = if der.get(1).is_some_and(|l| *l & 0x80 != 0) {
                3
            } else {
                2
            };
            der.get(body..body + 4) == Some(&[0x02, 0x01, 0x01, 0x04][..])
                && matches!(der.get(body + 4), Some(33 | 49))
        }
        _ => false,
    }
}
