//! The admin endpoint from the outside: HTTP GETs, the Prometheus text exposition parsed
//! into samples, and a node's status report (`/v1/status`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use std::ffi::OsString;
use std::path::Path;

use super::node::{Node, Ready};
use super::wait::wait_until;

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// GET: (status, body), or Err when nothing answers.
pub fn http_get(url: &str) -> Result<(u16, String), String> {
    let mut resp = agent()
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: body: {e}"))?;
    Ok((status, body))
}

pub fn get_ok(url: &str) -> String {
    match http_get(url) {
        Ok((200, body)) => body,
        other => panic!("GET {url}: {other:?}"),
    }
}

/// One sample of the text exposition: name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or(f64::NAN),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                // Label values here never contain `",` (volume and replica names are plain).
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label");
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Family names declared in an exposition (`# TYPE name kind`), with their kind.
pub fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (n, k) = l.split_once(' ')?;
            Some((n.to_string(), k.to_string()))
        })
        .collect()
}

pub struct Scrape(pub Vec<Sample>);

impl Scrape {
    pub fn of(metrics_port: u16) -> Scrape {
        Scrape(parse_exposition(&get_ok(&format!(
            "http://127.0.0.1:{metrics_port}/metrics"
        ))))
    }

    /// The value of the one series `name` with (at least) `labels`; panics if none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name}{labels:?} in /metrics; it has:\n{}",
                self.0
                    .iter()
                    .filter(|s| s.name == name)
                    .map(|s| format!("  {s:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let hits: Vec<&Sample> = self
            .0
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(hits.len() <= 1, "{name}{labels:?} is ambiguous: {hits:?}");
        hits.first().map(|s| s.value)
    }
}

/// What a node started with `Ready::Readyz` serves on its admin endpoint.
pub trait AdminNode {
    fn metrics_addr(&self) -> String;
    fn scrape(&self) -> Scrape;
    fn status(&self) -> Value;
    /// The state of replica `name` in this primary's status report.
    fn replica_state(&self, name: &str) -> String;
    fn wait_replica_state(&self, name: &str, state: &str, secs: u64);
}

impl AdminNode for Node {
    fn metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port())
    }

    fn scrape(&self) -> Scrape {
        Scrape::of(self.metrics_port())
    }

    fn status(&self) -> Value {
        serde_json::from_str(&get_ok(&format!(
            "http://127.0.0.1:{}/v1/status",
            self.metrics_port()
        )))
        .expect("status JSON")
    }

    fn replica_state(&self, name: &str) -> String {
        self.status()["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["state"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    fn wait_replica_state(&self, name: &str, state: &str, secs: u64) {
        wait_until(
            Duration::from_secs(secs),
            format_args!("{} to see replica {name} {state}", self.name),
            || {
                let s = self.replica_state(name);
                if s == state {
                    Ok(())
                } else {
                    Err(s)
                }
            },
        );
    }
}

/// A `blockrep serve` or `blockrep replica` process (`ARGS` on its command line) ready once
/// its /readyz on `metrics` answers 200 and its `port` accepts; restartable with the same
/// arguments.
pub fn launch_admin(name: &str, store: &Path, port: u16, metrics: u16, args: Vec<String>) -> Node {
    Node::builder(
        name,
        store,
        port,
        args.into_iter().map(OsString::from).collect(),
    )
    .ready(Ready::Readyz(metrics))
    .env("BLOCKREP_LOG", "info")
    .start_timeout(90)
    .start()
}
