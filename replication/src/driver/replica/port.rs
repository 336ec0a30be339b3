//! The replication port: accepting connections under a cap, and backing off when accepting
//! fails, so neither a flood of peers nor a process out of descriptors costs more than a
//! bounded amount of memory and CPU.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// At most this many replication connections are open at once. A replica serves one primary
/// and the odd promotion probe; the rest of the cap is headroom for reconnects whose old
/// connection has not closed yet. A connection past it is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// The first pause after a failed accept; each further failure in a row doubles it.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause between accepts that keep failing.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A connection taken under the cap; `slot` is held for as long as the connection lives.
pub(super) struct Admitted {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    pub slot: OwnedSemaphorePermit,
}

/// The listener, the cap's free slots, and the state of a burst of failures.
pub(super) struct Port {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    backoff: Backoff,
    /// Connections refused in the current burst of refusals (logged once, at its start).
    refused: u64,
}

impl Port {
    pub fn new(listener: TcpListener, cap: usize) -> Port {
        Port {
            listener,
            slots: Arc::new(Semaphore::new(cap)),
            backoff: Backoff::default(),
            refused: 0,
        }
    }

    /// The next connection that fits under the cap. Cancel-safe: a pause after a failure
    /// ends at a fixed instant, so a cancelled wait resumes where it was.
    pub async fn accept(&mut self) -> Admitted {
        loop {
            if let Some(at) = self.backoff.resume_at {
                tokio::time::sleep_until(at).await;
            }
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    self.backoff.failed(&e);
                    continue;
                }
            };
            self.backoff.succeeded();
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    if self.refused > 0 {
                        tracing::info!(
                            "replication port accepting again ({} connections refused over \
                             the cap of {MAX_CONNECTIONS})",
                            self.refused
                        );
                        self.refused = 0;
                    }
                    return Admitted { stream, addr, slot };
                }
                Err(_) => {
                    if self.refused == 0 {
                        tracing::warn!(
                            peer = %addr,
                            "replication port at its cap of {MAX_CONNECTIONS} connections; \
                             refusing new ones until some close"
                        );
                    }
                    self.refused += 1;
                    drop(stream);
                }
            }
        }
    }
}

/// Pauses between accepts that fail (EMFILE, ENFILE, ENOBUFS...): the failing connection
/// stays in the backlog, so retrying at once would spin. Logged once per burst.
#[derive(Debug, Default)]
struct Backoff {
    /// The current pause, `None` outside a burst of failures.
    delay: Option<Duration>,
    /// Accepting resumes at this instant.
    resume_at: Option<Instant>,
    /// Failures in the current burst.
    failures: u64,
}

impl Backoff {
    fn failed(&mut self, e: &std::io::Error) {
        let delay = match self.delay {
            None => {
                tracing::warn!(
                    "replication port cannot accept: {e}; retrying every {:?} up to {:?}",
                    ACCEPT_BACKOFF_MIN,
                    ACCEPT_BACKOFF_MAX
                );
                ACCEPT_BACKOFF_MIN
            }
            Some(d) => (d * 2).min(ACCEPT_BACKOFF_MAX),
        };
        self.delay = Some(delay);
        self.failures += 1;
        self.resume_at = Some(Instant::now() + delay);
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                "replication port accepting again after {} failed accepts",
                self.failures
            );
        }
        *self = Backoff::default();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Backoff, Port, ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN};

    #[test]
    fn accept_backoff_doubles_to_its_maximum_and_resets_on_success() {
        let mut b = Backoff::default();
        let e = std::io::Error::other("too many open files");
        let mut seen = Vec::new();
        for _ in 0..10 {
            b.failed(&e);
            seen.push(b.delay.unwrap());
        }
        assert_eq!(seen[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(seen[1], ACCEPT_BACKOFF_MIN * 2);
        assert!(seen.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*seen.last().unwrap(), ACCEPT_BACKOFF_MAX);
        assert!(b.resume_at.is_some());
        b.succeeded();
        assert!(b.delay.is_none() && b.resume_at.is_none() && b.failures == 0);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut port = Port::new(listener, 2);
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let first = port.accept().await;
        let second = port.accept().await;
        // The third is refused; accepting goes on waiting for a slot-holder to close.
        let waiting = tokio::time::timeout(Duration::from_millis(200), port.accept()).await;
        assert!(waiting.is_err(), "a third connection was admitted");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), clients[2].read(&mut buf))
            .await
            .expect("the refused connection was not closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        drop(first);
        clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        let again = tokio::time::timeout(Duration::from_secs(5), port.accept()).await;
        assert!(again.is_ok(), "a freed slot was not reused");
        drop(second);
    }
}
