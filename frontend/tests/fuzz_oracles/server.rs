//! A real `Server` on a Unix socket, fed one client byte stream per case.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use blockrep_frontend::{Exports, ListenAddr, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::common::{CASE_TIMEOUT, EXPORT, OTHER_EXPORT};
use super::transcript::{check_transcript, HandshakeStats};
use super::volume::MemVolume;

thread_local! {
    static PANICKED: Cell<bool> = const { Cell::new(false) };
}

/// Remembers, per thread, that a panic happened, then runs the previous hook (which prints
/// the message, or under libFuzzer aborts). The server's tasks run on the thread that calls
/// [`Harness::run`] (current-thread runtime), and tokio swallows panics in tasks, so this is
/// how a panic in a connection task is noticed.
fn install_panic_flag() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.with(|p| p.set(true));
            prev(info);
        }));
    });
}

const SOCKET_PREFIX: &str = "blockrep-fuzz-";

/// Removes socket files left in the temp dir by harnesses of processes that are gone (a
/// libFuzzer run exits without dropping its harness).
fn sweep_stale_sockets() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(SOCKET_PREFIX)) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A running server and a runtime to talk to it.
pub struct Harness {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<Result<(), blockrep_frontend::ServerError>>>,
    pub stats: HandshakeStats,
}

impl Harness {
    pub fn new() -> Harness {
        install_panic_flag();
        sweep_stale_sockets();
        static N: AtomicUsize = AtomicUsize::new(0);
        let socket = std::env::temp_dir().join(format!(
            "{SOCKET_PREFIX}{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut exports = Exports::new();
        exports.add(EXPORT, Arc::new(MemVolume::new()));
        exports.add(OTHER_EXPORT, Arc::new(MemVolume::new()));
        let server = rt
            .block_on(Server::bind(&[ListenAddr::Unix(socket.clone())]))
            .expect("bind the fuzz server");
        let shutdown = CancellationToken::new();
        let server = rt.spawn(server.run(exports, shutdown.clone()));
        Harness {
            rt,
            socket,
            shutdown,
            server: Some(server),
            stats: HandshakeStats::default(),
        }
    }

    /// Sends `client` as one connection's whole byte stream, half-closes, collects what the
    /// server sends until it closes, and checks it. Panics on any violation.
    pub fn run(&mut self, client: &[u8]) {
        PANICKED.with(|p| p.set(false));
        let socket = self.socket.clone();
        let input = client.to_vec();
        let reply = self.rt.block_on(async move {
            let stream = tokio::net::UnixStream::connect(&socket)
                .await
                .expect("connect to the fuzz server");
            let (mut r, mut w) = stream.into_split();
            let send = async move {
                // The server may hang up first (that is checked below); ignore EPIPE.
                let _ = w.write_all(&input).await;
                let _ = w.shutdown().await;
            };
            let recv = async move {
                let mut out = Vec::new();
                let res = r.read_to_end(&mut out).await;
                (out, res)
            };
            tokio::time::timeout(CASE_TIMEOUT, async { tokio::join!(send, recv).1 }).await
        });
        if PANICKED.with(|p| p.get()) {
            panic!(
                "the server panicked (message above) on client input {:02x?}",
                &client[..client.len().min(256)]
            );
        }
        let (out, _read_result) = reply.unwrap_or_else(|_| {
            panic!(
                "the server did not close the connection within {CASE_TIMEOUT:?} after the \
                 client finished sending {:02x?}",
                &client[..client.len().min(256)]
            )
        });
        // A read error (ECONNRESET) is acceptable: the server may hang up while bytes are
        // still unread; what arrived before is checked.
        check_transcript(client, &out, &mut self.stats);
        self.stats.cases += 1;
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), server).await });
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
