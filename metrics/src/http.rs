//! The admin endpoint, served by axum.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
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

async fn status(State(a): State<Admin>) -> Response {
    match build_status(&a).await {
        Some(report) => Json(report).into_response(),
        None => (StatusCode::INTERNAL_SERVER_ERROR, "status unavailable\n").into_response(),
    }
}

async fn set_address(State(a): State<Admin>, Path(name): Path<String>, body: String) -> Response {
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
