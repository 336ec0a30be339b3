//! The admin endpoint, served by axum. Its GETs are open (Prometheus scrapes them); the one
//! state-changing request, `PUT /v1/replicas/{name}/address`, needs the node's bearer token
//! and is refused outright on a node started without one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::{Metrics, StatusReport};

type StatusFn = dyn Fn() -> StatusReport + Send + Sync;
type AddressFn = dyn Fn(&str, &str) -> Result<(), String> + Send + Sync;

/// What the endpoint serves; the binary fills it in.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Builds the current status, and refreshes the point-in-time gauges from it.
    pub status: Arc<StatusFn>,
    /// Store open, role applied, listeners bound.
    pub ready: Arc<AtomicBool>,
    /// Points a replica at a new address (primaries only).
    pub set_replica_address: Option<Arc<AddressFn>>,
    /// Whether this node leads its volume now (`blockrep node`); `None`: a static node,
    /// which leads if it runs as a primary.
    pub leading: Option<Arc<AtomicBool>>,
    /// The bearer token a `PUT` must carry (the binary reads and checks it); `None` disables
    /// the `PUT` altogether.
    pub admin_token: Option<Arc<str>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Serves `admin` on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: &str,
    admin: Admin,
    shutdown: CancellationToken,
) -> Result<SocketAddr, AdminError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| AdminError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/v1/primary", get(primary))
        .route("/v1/replicas/{name}/address", put(set_address))
        .with_state(admin);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("admin endpoint stopped: {e}");
        }
    });
    Ok(local)
}

/// Builds the status off the async threads: it reads the store's superblock, whose lock a
/// checkpoint holds across an fdatasync, and a replica has a single async thread to block.
async fn build_status(a: &Admin) -> Option<StatusReport> {
    let status = a.status.clone();
    tokio::task::spawn_blocking(move || status()).await.ok()
}

async fn metrics(State(a): State<Admin>) -> Response {
    // Building the status refreshes the point-in-time gauges.
    let _ = build_status(&a).await;
    (
        [("content-type", "text/plain; version=0.0.4")],
        a.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(a): State<Admin>) -> Response {
    if a.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// 200 on the node that serves the volume, 503 on the others: the health check a load
/// balancer (HAProxy, as Patroni's users do) routes NBD clients with.
async fn primary(State(a): State<Admin>) -> Response {
    let leads = match &a.leading {
        Some(leading) => leading.load(Ordering::Acquire),
        None => build_status(&a).await.is_some_and(|r| r.role == "primary"),
    };
    if leads {
        (StatusCode::OK, "primary\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not the primary\n").into_response()
    }
}

async fn status(State(a): State<Admin>) -> Response {
    match build_status(&a).await {
        Some(report) => Json(report).into_response(),
        None => (StatusCode::INTERNAL_SERVER_ERROR, "status unavailable\n").into_response(),
    }
}

/// Why a state-changing request was refused; each has its own status.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// The node has no token: nothing may change state through the endpoint.
    Disabled,
    /// No `Authorization: Bearer` credentials (401, so the client knows what to send).
    Unauthenticated,
    /// Bearer credentials that are not the node's token.
    WrongToken,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Disabled => (
                StatusCode::FORBIDDEN,
                "this node's PUT is disabled: start it with --admin-token-file FILE (a token of \
                 at least 16 characters) and pass the same file to `blockrep set-address \
                 --admin-token-file FILE`\n",
            )
                .into_response(),
            Refusal::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                [(WWW_AUTHENTICATE, "Bearer realm=\"blockrep-admin\"")],
                "unauthorised: send `Authorization: Bearer TOKEN` with the token of the node's \
                 --admin-token-file (blockrep set-address --admin-token-file FILE)\n",
            )
                .into_response(),
            Refusal::WrongToken => (
                StatusCode::FORBIDDEN,
                "forbidden: the bearer token is not this node's --admin-token-file token\n",
            )
                .into_response(),
        }
    }
}

/// The bearer token of a request's `Authorization` header, if it has one (the scheme's
/// name is case-insensitive, RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether `headers` carry the node's token; compared in constant time, so the answer's
/// timing says nothing about how much of a guess was right.
fn authorise(expected: Option<&str>, headers: &HeaderMap) -> Result<(), Refusal> {
    let expected = expected.ok_or(Refusal::Disabled)?;
    let given = bearer(headers).ok_or(Refusal::Unauthenticated)?;
    if bool::from(expected.as_bytes().ct_eq(given)) {
        Ok(())
    } else {
        Err(Refusal::WrongToken)
    }
}

async fn set_address(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Err(refusal) = authorise(a.admin_token.as_deref(), &headers) {
        tracing::info!("refused PUT /v1/replicas/{name}/address: {refusal:?}");
        return refusal.into_response();
    }
    let Some(set) = &a.set_replica_address else {
        return (StatusCode::CONFLICT, "this node is not a primary\n").into_response();
    };
    let addr = body.trim();
    if !addr.contains(':') {
        return (StatusCode::BAD_REQUEST, "the body must be HOST:PORT\n").into_response();
    }
    match set(&name, addr) {
        Ok(()) => (StatusCode::OK, format!("{name} is now at {addr}\n")).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Mutex;

    const TOKEN: &str = "0123456789abcdef-token";

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = auth {
            h.insert(AUTHORIZATION, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn without_a_token_the_put_is_disabled_whatever_it_sends() {
        for auth in [None, Some("Bearer 0123456789abcdef-token")] {
            assert_eq!(authorise(None, &headers(auth)), Err(Refusal::Disabled));
        }
    }

    #[test]
    fn missing_or_non_bearer_credentials_are_unauthenticated() {
        for auth in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer    "),
            Some("Basic dXNlcjpwYXNz"),
            Some("Token 0123456789abcdef-token"),
        ] {
            assert_eq!(
                authorise(Some(TOKEN), &headers(auth)),
                Err(Refusal::Unauthenticated),
                "{auth:?}"
            );
        }
    }

    #[test]
    fn only_the_exact_token_is_authorised() {
        for ok in [
            "Bearer 0123456789abcdef-token",
            "bearer 0123456789abcdef-token",
            "BEARER   0123456789abcdef-token ",
        ] {
            assert_eq!(authorise(Some(TOKEN), &headers(Some(ok))), Ok(()), "{ok}");
        }
        for wrong in [
            "Bearer 0123456789abcdef-tokeN",
            "Bearer 0123456789abcdef-toke",
            "Bearer 0123456789abcdef-token2",
            "Bearer x",
        ] {
            assert_eq!(
                authorise(Some(TOKEN), &headers(Some(wrong))),
                Err(Refusal::WrongToken),
                "{wrong}"
            );
        }
    }

    /// One HTTP/1.0 request to `addr`: (status, the whole response).
    fn request(addr: SocketAddr, req: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(req.as_bytes()).expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("answer");
        let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, out)
    }

    fn put(addr: SocketAddr, auth: Option<&str>) -> (u16, String) {
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        request(
            addr,
            &format!(
                "PUT /v1/replicas/r1/address HTTP/1.0\r\nHost: x\r\n{auth}Content-Length: \
                 14\r\n\r\n127.0.0.1:4242"
            ),
        )
    }

    async fn start(token: Option<&str>, calls: Arc<Mutex<Vec<String>>>) -> SocketAddr {
        let admin = Admin {
            metrics: Arc::new(Metrics::new().expect("metrics")),
            status: Arc::new(StatusReport::default),
            ready: Arc::new(AtomicBool::new(true)),
            set_replica_address: Some(Arc::new(move |name: &str, addr: &str| {
                calls.lock().expect("calls").push(format!("{name}={addr}"));
                Ok(())
            })),
            admin_token: token.map(Arc::from),
            leading: None,
        };
        serve("127.0.0.1:0", admin, CancellationToken::new())
            .await
            .expect("serve")
    }

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f)
            .await
            .expect("request thread")
    }

    #[tokio::test]
    async fn a_put_without_a_configured_token_is_refused_and_changes_nothing() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let addr = start(None, calls.clone()).await;
        let (status, text) = blocking(move || put(addr, Some(&format!("Bearer {TOKEN}")))).await;
        assert_eq!(status, 403, "{text}");
        assert!(text.contains("--admin-token-file"), "{text}");
        assert!(calls.lock().expect("calls").is_empty());
        // The GETs stay open.
        let (status, _) = blocking(move || request(addr, "GET /v1/status HTTP/1.0\r\n\r\n")).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn a_put_needs_the_bearer_token() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let addr = start(Some(TOKEN), calls.clone()).await;
        let (status, text) = blocking(move || put(addr, None)).await;
        assert_eq!(status, 401, "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: bearer realm=\"blockrep-admin\""),
            "{text}"
        );
        let (status, text) = blocking(move || put(addr, Some("Bearer not-the-token-at-all"))).await;
        assert_eq!(status, 403, "{text}");
        assert!(calls.lock().expect("calls").is_empty());
        let (status, text) = blocking(move || put(addr, Some(&format!("Bearer {TOKEN}")))).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(*calls.lock().expect("calls"), ["r1=127.0.0.1:4242"]);
        let (status, _) = blocking(move || request(addr, "GET /metrics HTTP/1.0\r\n\r\n")).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn v1_primary_answers_200_only_while_the_node_leads() {
        let leading = Arc::new(AtomicBool::new(false));
        let admin = Admin {
            metrics: Arc::new(Metrics::new().expect("metrics")),
            status: Arc::new(StatusReport::default),
            ready: Arc::new(AtomicBool::new(true)),
            set_replica_address: None,
            admin_token: None,
            leading: Some(leading.clone()),
        };
        let addr = serve("127.0.0.1:0", admin, CancellationToken::new())
            .await
            .expect("serve");
        let get = move || request(addr, "GET /v1/primary HTTP/1.0\r\n\r\n");
        let (status, text) = blocking(get).await;
        assert_eq!(status, 503, "{text}");
        leading.store(true, Ordering::Release);
        let (status, text) = blocking(get).await;
        assert_eq!(status, 200, "{text}");
    }
}
