//! The flags every etcd-backed command shares (`blockrep node`, `blockrep ctl`): where etcd
//! is, how to reach it (TLS under etcdctl's flag names), and which volume's directory to use.

use std::path::PathBuf;
use std::time::Duration;

use blockrep_control::keys::{KeyError, DEFAULT_PREFIX};
use blockrep_control::Keys;
use clap::Args;
use thiserror::Error;

/// A combination of etcd flags that cannot work; each says what to change, in one line.
#[derive(Debug, Error)]
pub enum EtcdArgsError {
    #[error("--etcd-endpoints is empty: give at least one URL, like http://127.0.0.1:2379")]
    NoEndpoints,
    #[error("--etcd-endpoints {0:?} is not http://HOST:PORT, https://HOST:PORT or HOST:PORT")]
    Endpoint(String),
    #[error(
        "--etcd-endpoints mixes http:// and https:// URLs: etcd's TLS is all or nothing per client"
    )]
    MixedSchemes,
    #[error("--etcd-cert and --etcd-key go together: give both or neither")]
    HalfIdentity,
    #[error(
        "TLS to etcd (--etcd-cacert/--etcd-cert/--etcd-key) needs https:// endpoints, not {0:?}"
    )]
    TlsOverHttp(String),
    #[error("https:// endpoints need --etcd-cacert (the CA that signed etcd's certificate)")]
    HttpsWithoutCa,
    #[error("--etcd-timeout must be between 0.1 and 600 seconds, not {0}")]
    Timeout(f64),
    #[error(transparent)]
    Keys(#[from] KeyError),
}

#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd's client URLs (comma-separated or repeated), like http://10.0.0.1:2379.
    #[arg(long = "etcd-endpoints", value_name = "URL[,URL...]", value_delimiter = ',', required = true, num_args = 1..)]
    pub endpoints: Vec<String>,
    /// The directory in etcd under which every volume has its own.
    #[arg(long = "etcd-prefix", value_name = "PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// The CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long = "etcd-cacert", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// A client certificate (PEM), for an etcd started with --client-cert-auth.
    #[arg(long = "etcd-cert", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long = "etcd-key", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// How long one etcd request (or connecting) may take before it counts as failed.
    #[arg(long = "etcd-timeout", value_name = "SECONDS", default_value_t = 5.0)]
    pub timeout_secs: f64,
    /// The volume's name: its directory under the prefix.
    #[arg(long, value_name = "NAME")]
    pub volume: String,
}

impl EtcdArgs {
    /// Checks the flags together, so a mistake is one line at start-up instead of a
    /// connection failure later.
    pub fn validate(&self) -> Result<(), EtcdArgsError> {
        if self.endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(EtcdArgsError::NoEndpoints);
        }
        let mut schemes = Vec::new();
        for e in self.endpoints() {
            schemes.push(scheme_of(&e)?);
        }
        let https = schemes.contains(&Scheme::Https);
        let http = schemes.contains(&Scheme::Http);
        if https && http {
            return Err(EtcdArgsError::MixedSchemes);
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(EtcdArgsError::HalfIdentity);
        }
        let tls = self.cacert.is_some() || self.cert.is_some();
        if tls && http {
            let plain = self
                .endpoints()
                .into_iter()
                .find(|e| e.starts_with("http://"))
                .unwrap_or_default();
            return Err(EtcdArgsError::TlsOverHttp(plain));
        }
        if https && self.cacert.is_none() {
            return Err(EtcdArgsError::HttpsWithoutCa);
        }
        self.timeout()?;
        self.keys()?;
        Ok(())
    }

    /// The endpoints as given, trimmed, empty entries (a trailing comma) left out.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect()
    }

    /// Whether requests go over TLS (an https:// endpoint, or bare HOST:PORT with a CA).
    pub fn tls(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some()
    }

    pub fn timeout(&self) -> Result<Duration, EtcdArgsError> {
        let s = self.timeout_secs;
        if !(0.1..=600.0).contains(&s) {
            return Err(EtcdArgsError::Timeout(s));
        }
        Ok(Duration::from_secs_f64(s))
    }

    pub fn keys(&self) -> Result<Keys, EtcdArgsError> {
        Ok(Keys::new(&self.prefix, &self.volume)?)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
    Bare,
}

fn scheme_of(endpoint: &str) -> Result<Scheme, EtcdArgsError> {
    let bad = || EtcdArgsError::Endpoint(endpoint.to_string());
    let (scheme, rest) = if let Some(rest) = endpoint.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = endpoint.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        (Scheme::Bare, endpoint)
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty() && !host.contains('/') && !host.contains(char::is_whitespace);
    if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(scheme)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoints: &[&str]) -> EtcdArgs {
        EtcdArgs {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            prefix: DEFAULT_PREFIX.to_string(),
            cacert: None,
            cert: None,
            key: None,
            timeout_secs: 5.0,
            volume: "vol".to_string(),
        }
    }

    #[test]
    fn plain_endpoints_of_every_form_are_accepted() {
        let a = args(&[
            "http://127.0.0.1:2379",
            "10.0.0.2:2379",
            "http://[::1]:2379/",
        ]);
        assert!(a.validate().is_ok(), "{:?}", a.validate());
        assert!(!a.tls());
    }

    #[test]
    fn malformed_endpoints_are_refused_by_name() {
        for bad in [
            "127.0.0.1",
            "http://host:0",
            "http://host:port",
            "ftp://h:1/x",
            ":2379",
        ] {
            let e = args(&[bad]).validate();
            assert!(
                matches!(e, Err(EtcdArgsError::Endpoint(ref s)) if s == bad),
                "{bad}: {e:?}"
            );
        }
        assert!(matches!(
            args(&["", " "]).validate(),
            Err(EtcdArgsError::NoEndpoints)
        ));
    }

    #[test]
    fn tls_flags_must_fit_the_endpoints() {
        let mut a = args(&["https://h:2379"]);
        assert!(matches!(a.validate(), Err(EtcdArgsError::HttpsWithoutCa)));
        a.cacert = Some("ca.pem".into());
        assert!(a.validate().is_ok());
        a.cert = Some("c.pem".into());
        assert!(matches!(a.validate(), Err(EtcdArgsError::HalfIdentity)));
        a.key = Some("k.pem".into());
        assert!(a.validate().is_ok());
        a.endpoints.push("http://h2:2379".into());
        assert!(matches!(a.validate(), Err(EtcdArgsError::MixedSchemes)));
        let mut plain = args(&["http://h:2379"]);
        plain.cacert = Some("ca.pem".into());
        assert!(matches!(
            plain.validate(),
            Err(EtcdArgsError::TlsOverHttp(_))
        ));
    }

    #[test]
    fn bad_volume_prefix_and_timeout_are_refused() {
        let mut a = args(&["h:1"]);
        a.volume = "a/b".into();
        assert!(matches!(
            a.validate(),
            Err(EtcdArgsError::Keys(KeyError::Name(_)))
        ));
        let mut a = args(&["h:1"]);
        a.prefix = "blockrep".into();
        assert!(matches!(
            a.validate(),
            Err(EtcdArgsError::Keys(KeyError::Prefix(_)))
        ));
        let mut a = args(&["h:1"]);
        a.timeout_secs = 0.0;
        assert!(matches!(a.validate(), Err(EtcdArgsError::Timeout(_))));
    }
}
