//! `blockrep status` and `blockrep set-address`: clients of a node's admin endpoint; and the
//! admin token file, read the same way by the node that checks the token and the client that
//! sends it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blockrep_metrics::StatusReport;

use crate::support::human;

/// The shortest token accepted: guessing 16 random characters over the network is hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

/// The bearer token of `--admin-token-file`: the file's contents, trimmed.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("--admin-token-file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--admin-token-file {}: the file is empty; put a token of at least {MIN_TOKEN_LEN} \
             characters in it (for example `openssl rand -hex 32 > FILE; chmod 600 FILE`)",
            path.display())]
    Empty { path: PathBuf },
    #[error("--admin-token-file {}: the token is {len} characters; it must be at least \
             {MIN_TOKEN_LEN} (for example `openssl rand -hex 32 > FILE`)", path.display())]
    TooShort { path: PathBuf, len: usize },
    #[error("--admin-token-file {}: the token must be printable ASCII with no spaces (it is \
             sent in an HTTP header); `openssl rand -hex 32` makes one", path.display())]
    Unprintable { path: PathBuf },
}

impl AdminToken {
    /// Reads and checks the token in `path`; warns (once) when others than its owner may
    /// read the file.
    pub fn load(path: &Path) -> Result<AdminToken, TokenError> {
        let read = |source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(read)?;
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        let token = AdminToken::parse(&text).map_err(|e| e.at(path))?;
        if readable_by_others(mode) {
            tracing::warn!(
                "--admin-token-file {}: readable by group or others (mode {:04o}); anyone who \
                 reads it can redirect replicas: chmod 600 {0}",
                path.display(),
                mode & 0o7777
            );
        }
        Ok(token)
    }

    /// The token in a file's text, checked.
    fn parse(text: &str) -> Result<AdminToken, TokenProblem> {
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenProblem::Empty);
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenProblem::Unprintable);
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenProblem::TooShort(token.len()));
        }
        Ok(AdminToken(Arc::from(token)))
    }

    pub fn secret(&self) -> Arc<str> {
        self.0.clone()
    }
}

/// What is wrong with a token, before the file's name is attached.
#[derive(Debug, PartialEq, Eq)]
enum TokenProblem {
    Empty,
    TooShort(usize),
    Unprintable,
}

impl TokenProblem {
    fn at(self, path: &Path) -> TokenError {
        let path = path.to_path_buf();
        match self {
            TokenProblem::Empty => TokenError::Empty { path },
            TokenProblem::TooShort(len) => TokenError::TooShort { path, len },
            TokenProblem::Unprintable => TokenError::Unprintable { path },
        }
    }
}

fn readable_by_others(mode: u32) -> bool {
    mode & 0o044 != 0
}

fn url(admin: &str, path: &str) -> String {
    let base = admin.trim_end_matches('/');
    if base.starts_with("http://") {
        format!("{base}{path}")
    } else {
        format!("http://{base}{path}")
    }
}

fn fetch(admin: &str) -> Result<StatusReport> {
    let body = ureq::get(&url(admin, "/v1/status"))
        .call()
        .with_context(|| format!("cannot reach the node's admin endpoint at {admin}"))?
        .body_mut()
        .read_to_string()
        .context("reading the status")?;
    serde_json::from_str(&body).context("the node answered something that is not a status")
}

pub fn show(admin: &str, json: bool, watch: bool) -> Result<()> {
    loop {
        let report = fetch(admin)?;
        let text = if json {
            serde_json::to_string_pretty(&report)?
        } else {
            render(&report)
        };
        if watch {
            // Clear the screen and redraw.
            println!("\x1b[2J\x1b[H{text}");
            std::io::stdout().flush()?;
            std::thread::sleep(Duration::from_secs(1));
        } else {
            println!("{text}");
            return Ok(());
        }
    }
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done as f64 / total as f64) * width as f64).round() as usize
    };
    format!(
        "[{}{}]",
        "#".repeat(filled.min(width)),
        "-".repeat(width - filled.min(width))
    )
}

pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    let mode = r.commit_mode.as_deref().unwrap_or("-");
    out.push_str(&format!(
        "volume {}  {}  epoch {}  commit {mode}\n",
        r.volume, r.role, r.epoch
    ));
    out.push_str(&format!("store  {}\n", r.store));
    out.push_str(&format!(
        "LSN    head {}  durable {}  committed {}  checkpoint {}\n",
        r.head_lsn, r.durable_lsn, r.committed_lsn, r.checkpoint_lsn
    ));
    out.push_str(&format!(
        "WAL    {} of {} used, from LSN {}\n",
        human(r.wal_used_bytes),
        human(r.wal_capacity_bytes),
        r.wal_oldest_lsn
    ));
    if let Some(h) = &r.wal_hold {
        out.push_str(&format!(
            "       held from LSN {} ({})\n",
            h.from_lsn, h.reason
        ));
    }
    if let Some(e) = r.fenced_by {
        out.push_str(&format!(
            "FENCED by epoch {e}: this primary refuses every write\n"
        ));
    }
    if r.rebuilding {
        out.push_str("REBUILDING: this store's contents are incomplete\n");
        if let Some(at) = r.rebuild_cursor_bytes {
            out.push_str(&format!(
                "       {} of the base durable (a resume keeps it)\n",
                human(at)
            ));
        }
    }
    if !r.replicas.is_empty() {
        out.push_str(&format!(
            "\n{:<10} {:<22} {:<14} {:>10} {:>9} {:>10} {:>8}  {}\n",
            "replica", "address", "state", "durable", "lag LSN", "lag", "lag s", "reason"
        ));
        for p in &r.replicas {
            out.push_str(&format!(
                "{:<10} {:<22} {:<14} {:>10} {:>9} {:>10} {:>8.2}  {}\n",
                p.name,
                p.address,
                p.state,
                p.durable_lsn,
                p.lag_lsn,
                human(p.lag_bytes),
                p.lag_seconds,
                p.reason
            ));
            if let Some(b) = &p.rebuild {
                let pct = if b.bytes_total > 0 {
                    100.0 * b.bytes_done as f64 / b.bytes_total as f64
                } else {
                    0.0
                };
                let eta = b
                    .eta_seconds
                    .map_or("-".to_string(), |s| format!("{s:.0} s"));
                out.push_str(&format!(
                    "           rebuild {} {pct:5.1}%  {} of {}  ETA {eta}\n",
                    bar(b.bytes_done, b.bytes_total, 30),
                    human(b.bytes_done),
                    human(b.bytes_total)
                ));
                let resumed = b
                    .resumed_from
                    .map_or(String::new(), |at| format!("  resumed at {}", human(at)));
                out.push_str(&format!(
                    "           {} of base data sent{resumed}\n",
                    human(b.sent_bytes)
                ));
            }
            if let Some(c) = &p.last_rebuild {
                out.push_str(&format!(
                    "           last rebuild: {} sent, in sync after {:.1} s ({} resumed, {} \
                     restarted)\n",
                    human(c.sent_bytes),
                    c.seconds_to_in_sync,
                    c.resumes,
                    c.restarts
                ));
            }
        }
    }
    out
}

/// Why `blockrep set-address` failed, by the HTTP status the primary answered.
#[derive(Debug, thiserror::Error)]
pub enum SetAddressError {
    #[error(
        "unauthorised: the primary at {admin} needs its token; pass --admin-token-file FILE \
             (the file the primary was started with)"
    )]
    Unauthorised { admin: String },
    #[error("forbidden: the primary at {admin} does not accept the token in --admin-token-file \
             {}: it must be the same file the primary was started with ({answer})",
            file.display())]
    WrongToken {
        admin: String,
        file: PathBuf,
        answer: String,
    },
    #[error(
        "forbidden: the primary at {admin} has address updates disabled; restart it with \
             --admin-token-file FILE and pass the same file here ({answer})"
    )]
    Disabled { admin: String, answer: String },
    #[error("the node at {admin} is not a primary ({answer})")]
    NotPrimary { admin: String, answer: String },
    #[error("the primary at {admin} has no such replica: {answer}")]
    UnknownReplica { admin: String, answer: String },
    #[error("the primary at {admin} answered {status}: {answer}")]
    Other {
        admin: String,
        status: u16,
        answer: String,
    },
}

impl SetAddressError {
    /// The error for a refusal with `status` and `answer`, sent with or without a token.
    fn from_status(admin: &str, status: u16, answer: String, token: Option<&Path>) -> Self {
        let admin = admin.to_string();
        let answer = answer.trim().to_string();
        match (status, token) {
            (401, _) => SetAddressError::Unauthorised { admin },
            (403, Some(file)) => SetAddressError::WrongToken {
                admin,
                file: file.to_path_buf(),
                answer,
            },
            (403, None) => SetAddressError::Disabled { admin, answer },
            (409, _) => SetAddressError::NotPrimary { admin, answer },
            (404, _) => SetAddressError::UnknownReplica { admin, answer },
            (status, _) => SetAddressError::Other {
                admin,
                status,
                answer,
            },
        }
    }
}

pub fn set_address(admin: &str, replica: &str, token_file: Option<&Path>) -> Result<()> {
    let Some((name, addr)) = replica.split_once('=') else {
        bail!("{replica:?} is not NAME=HOST:PORT");
    };
    let token = token_file.map(AdminToken::load).transpose()?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut request = agent.put(&url(admin, &format!("/v1/replicas/{name}/address")));
    if let Some(t) = &token {
        request = request.header("Authorization", &format!("Bearer {}", t.secret()));
    }
    let mut response = request
        .send(addr)
        .with_context(|| format!("cannot reach the primary's admin endpoint at {admin}"))?;
    let status = response.status().as_u16();
    let answer = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer of the primary at {admin}"))?;
    if status != 200 {
        return Err(SetAddressError::from_status(admin, status, answer, token_file).into());
    }
    print!("{answer}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_trimmed_and_checked() {
        let t = AdminToken::parse("  0123456789abcdef\n").expect("a good token");
        assert_eq!(&*t.secret(), "0123456789abcdef");
        assert_eq!(AdminToken::parse(" \n\t").err(), Some(TokenProblem::Empty));
        assert_eq!(
            AdminToken::parse("0123456789abcde\n").err(),
            Some(TokenProblem::TooShort(15))
        );
        assert_eq!(
            AdminToken::parse("0123456789 abcdef").err(),
            Some(TokenProblem::Unprintable)
        );
        assert_eq!(
            AdminToken::parse("0123456789abcdéf").err(),
            Some(TokenProblem::Unprintable)
        );
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let t = AdminToken::parse("0123456789abcdef-secret").expect("a good token");
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn only_group_or_other_read_bits_warn() {
        assert!(!readable_by_others(0o100600));
        assert!(!readable_by_others(0o100400));
        assert!(!readable_by_others(0o100620));
        assert!(readable_by_others(0o100640));
        assert!(readable_by_others(0o100604));
        assert!(readable_by_others(0o100644));
    }

    #[test]
    fn refusals_are_typed_by_status() {
        let f = Path::new("/tmp/t");
        let e = |status, token| SetAddressError::from_status("a:1", status, "x\n".into(), token);
        assert!(matches!(e(401, None), SetAddressError::Unauthorised { .. }));
        assert!(matches!(
            e(401, Some(f)),
            SetAddressError::Unauthorised { .. }
        ));
        assert!(matches!(
            e(403, Some(f)),
            SetAddressError::WrongToken { .. }
        ));
        assert!(matches!(e(403, None), SetAddressError::Disabled { .. }));
        assert!(matches!(e(409, None), SetAddressError::NotPrimary { .. }));
        assert!(matches!(
            e(404, None),
            SetAddressError::UnknownReplica { .. }
        ));
        assert!(matches!(
            e(500, None),
            SetAddressError::Other { status: 500, .. }
        ));
        assert!(e(401, None).to_string().starts_with("unauthorised: "));
        assert!(e(401, None).to_string().contains("pass --admin-token-file"));
    }
}
