//! Listeners, the accept loop, and graceful shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, DEFAULT_MEMORY_BUDGET};
use crate::connection::{self, Bounds, SHUTDOWN_GRACE};
use crate::exports::Exports;
use crate::handshake::{self, HandshakeError};
use crate::observe::{NoObserver, Observer};
use crate::stream::Plain;
use crate::tls::Tls;
use crate::volume::BlockVolume;

/// A client that has not finished negotiating by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_CONNECTIONS: usize = 1024;

/// Where to listen: `host:port` or `unix:/path/to/socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<ListenAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, as in unix:/run/blockrep.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((_, port)) if port.parse::<u16>().is_ok() => Ok(ListenAddr::Tcp(s.to_string())),
            _ => Err(format!(
                "{s:?} is not host:port or unix:/path (for example 127.0.0.1:10809)"
            )),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: String, reason: String },
    #[error("no export to serve")]
    NoExports,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// An NBD server bound to its listeners, ready to run.
pub struct Server {
    listeners: Vec<Listener>,
    observer: Arc<dyn Observer>,
    tls: Arc<Tls>,
    memory_budget: u64,
    idle_timeout: Option<Duration>,
    shutdown_grace: Duration,
}

/// What every connection shares: the exports and the server's settings.
struct Shared<V> {
    exports: Exports<V>,
    observer: Arc<dyn Observer>,
    tls: Arc<Tls>,
    bounds: Bounds,
}

impl Server {
    /// Binds every address. A Unix socket path left behind by a dead server is replaced; one
    /// a live server still answers on is an error. Nothing is served until [`Server::run`].
    pub async fn bind(addrs: &[ListenAddr]) -> Result<Server, ServerError> {
        let mut listeners = Vec::new();
        for addr in addrs {
            let bind_err = |reason: String| ServerError::Bind {
                addr: addr.to_string(),
                reason,
            };
            let listener = match addr {
                ListenAddr::Tcp(a) => Listener::Tcp(
                    TcpListener::bind(a)
                        .await
                        .map_err(|e| bind_err(e.to_string()))?,
                ),
                ListenAddr::Unix(path) => {
                    remove_stale_socket(path).map_err(bind_err)?;
                    Listener::Unix(
                        UnixListener::bind(path).map_err(|e| bind_err(e.to_string()))?,
                        path.clone(),
                    )
                }
            };
            listeners.push(listener);
        }
        Ok(Server {
            listeners,
            observer: Arc::new(NoObserver),
            tls: Arc::new(Tls::off()),
            memory_budget: DEFAULT_MEMORY_BUDGET,
            idle_timeout: None,
            shutdown_grace: SHUTDOWN_GRACE,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .map(|l| match l {
                Listener::Tcp(t) => ListenAddr::Tcp(
                    t.local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|_| "?".into()),
                ),
                Listener::Unix(_, p) => ListenAddr::Unix(p.clone()),
            })
            .collect()
    }

    /// Reports every request and connection to `observer` (metrics).
    pub fn observe(mut self, observer: Arc<dyn Observer>) -> Server {
        self.observer = observer;
        self
    }

    /// Offers (or requires) TLS through STARTTLS; without this, STARTTLS is refused.
    pub fn tls(mut self, tls: Tls) -> Server {
        self.tls = Arc::new(tls);
        self
    }

    /// At most `bytes` of request payload and reply data resident across all connections
    /// (each connection also keeps to 64 MiB of its own); default [`DEFAULT_MEMORY_BUDGET`].
    pub fn memory_budget(mut self, bytes: u64) -> Server {
        self.memory_budget = bytes;
        self
    }

    /// Closes a connection with nothing in flight that has sent no request (and been sent no
    /// reply) for `timeout`; `None` (the default) never does.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Server {
        self.idle_timeout = timeout;
        self
    }

    /// How long each connection may still answer the requests it has read once the server
    /// stops (default [`SHUTDOWN_GRACE`]). A server whose volume answers nothing more once
    /// it is told to stop has nothing to wait for, and a short grace lets its clients
    /// reconnect elsewhere at once.
    pub fn shutdown_grace(mut self, grace: Duration) -> Server {
        self.shutdown_grace = grace;
        self
    }

    /// Serves `exports` until `shutdown` is cancelled, then stops accepting, gives every
    /// connection its shutdown grace to answer the requests it has read, drops what is
    /// left, and returns.
    pub async fn run<V: BlockVolume>(
        self,
        exports: Exports<V>,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        if exports.is_empty() {
            return Err(ServerError::NoExports);
        }
        let shared = Arc::new(Shared {
            exports,
            observer: self.observer,
            tls: self.tls,
            bounds: Bounds {
                budget: Budget::new(self.memory_budget),
                idle_timeout: self.idle_timeout,
                shutdown_grace: self.shutdown_grace,
            },
        });
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut accepts = JoinSet::new();
        let mut sockets = Vec::new();
        for listener in self.listeners {
            if let Listener::Unix(_, p) = &listener {
                sockets.push(p.clone());
            }
            accepts.spawn(accept_loop(
                listener,
                shared.clone(),
                shutdown.clone(),
                limit.clone(),
            ));
        }
        // Every connection keeps to its grace on its own; this bounds the whole server even
        // if one did not (dropping `accepts` drops every connection left).
        let grace = self.shutdown_grace;
        let late = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace + Duration::from_secs(1)).await;
        };
        tokio::select! {
            _ = async { while accepts.join_next().await.is_some() {} } => {}
            _ = late => tracing::warn!("connections still open {grace:?} after shutdown; dropping them"),
        }
        drop(accepts);
        for p in sockets {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err("the path exists and is not a socket; refusing to replace it".into());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err("another server is listening on this socket".into());
    }
    std::fs::remove_file(path).map_err(|e| format!("cannot remove stale socket: {e}"))
}

async fn accept_loop<V: BlockVolume>(
    listener: Listener,
    shared: Arc<Shared<V>>,
    shutdown: CancellationToken,
    limit: Arc<Semaphore>,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "refusing connection: {MAX_CONNECTIONS} clients already connected");
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            handle_client(stream, &peer, &shared, shutdown).await;
            drop(permit);
        });
    }
    // Closed at once, so a client connecting to a stopping server is refused (and tries
    // another) rather than left waiting in the backlog until the grace is over.
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn accept(listener: &Listener) -> std::io::Result<(Plain, String)> {
    Ok(match listener {
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            (Plain::Tcp(s), addr.to_string())
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            (Plain::Unix(s), format!("unix:{}", path.display()))
        }
    })
}

async fn handle_client<V: BlockVolume>(
    stream: Plain,
    peer: &str,
    shared: &Shared<V>,
    shutdown: CancellationToken,
) {
    // A client idling anywhere in the handshake must not hold up a shutdown.
    let negotiated = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return,
        n = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake::negotiate(stream, &shared.exports, &shutdown, &shared.tls),
        ) => n,
    };
    let (stream, neg) = match negotiated {
        Err(_) => {
            tracing::info!(%peer, "handshake timed out");
            return;
        }
        Ok(Ok(Some(neg))) => neg,
        Ok(Ok(None)) => return,
        Ok(Err(HandshakeError::Io(e))) => {
            tracing::debug!(%peer, "client left during the handshake: {e}");
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, "handshake failed: {e}");
            return;
        }
    };
    let tls = stream.is_tls();
    tracing::debug!(%peer, export = %neg.export, structured = neg.structured, tls, "client connected");
    let (reader, writer) = stream.into_split();
    let export = neg.export.clone();
    let observer = &shared.observer;
    observer.connection(&export, 1);
    connection::serve(
        reader,
        writer,
        neg,
        shutdown,
        observer.clone(),
        &shared.bounds,
        peer,
    )
    .await;
    observer.connection(&export, -1);
}
