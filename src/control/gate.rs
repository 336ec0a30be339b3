//! The acknowledgement gate: the one place a leader's lease deadline meets its NBD replies.
//!
//! The controller loop publishes the lease deadline (from the send time of the last
//! keep-alive etcd answered, minus the margin) into an [`AckGate`]; [`StoreVolume`] asks it
//! before every acknowledgement: a write, a FUA, a FLUSH, a TRIM, a WRITE_ZEROES, and a read
//! reply too, because a read answered after another node may have taken over could return
//! data older than a write that node has already acknowledged (linearizability).
//!
//! The deadline is an `AtomicU64` of milliseconds since the gate's own `Instant`, so the
//! check on the request path is one load and one clock read; the controller loop uses the
//! same clock ([`AckGate::now`]), so the two can never disagree about what "now" means.
//!
//! [`StoreVolume`]: crate::volume::StoreVolume

use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use blockrep_frontend::VolumeError;
use blockrep_replication::core::Millis;
use tokio::sync::Notify;

/// What a leader does with requests once its lease deadline has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnLeaseLoss {
    /// Stop replying; the node then drops its NBD connections, so a kernel client requeues
    /// the requests and resends them to whichever node serves next.
    #[default]
    Suspend,
    /// Fail every request with NBD_ESHUTDOWN.
    IoError,
}

/// The deadline a leader acknowledges by, shared between the controller loop and the
/// volume it serves. One gate belongs to one term as primary: once [`AckGate::close`]d it
/// never opens again, so a request held since an earlier term cannot be answered by a later
/// one (after a step-down the store may have been rewound by the new leader).
///
/// Invariant (`no_acknowledgement_after_the_lease_deadline`): [`AckGate::admit`] returns
/// `Ok` only while the clock reads before the published deadline and the gate is open.
#[derive(Debug)]
pub struct AckGate {
    origin: Instant,
    /// Milliseconds since `origin`; 0 admits nothing.
    deadline: AtomicU64,
    closed: AtomicBool,
    on_loss: OnLeaseLoss,
    /// Wakes requests suspended on an expired deadline when a later one is published.
    renewed: Notify,
}

impl AckGate {
    /// A gate that admits nothing until a deadline is published.
    pub fn new(origin: Instant, on_loss: OnLeaseLoss) -> AckGate {
        AckGate {
            origin,
            deadline: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            on_loss,
            renewed: Notify::new(),
        }
    }

    /// The gate's clock: milliseconds since its origin, on the monotonic clock.
    pub fn now(&self) -> Millis {
        clock(self.origin)
    }

    /// Publishes the controller's deadline (`None`: admit nothing). A closed gate ignores it.
    pub fn set_deadline(&self, deadline: Option<Millis>) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        self.deadline
            .store(deadline.unwrap_or(0), Ordering::Release);
        self.renewed.notify_waiters();
    }

    /// Ends this term: nothing is admitted any more, whatever is published later.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.deadline.store(0, Ordering::Release);
        self.renewed.notify_waiters();
    }

    /// Whether an acknowledgement may leave now.
    pub fn holds(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.now() < self.deadline.load(Ordering::Acquire)
    }

    /// Waits until an acknowledgement may leave. Past the deadline, `io-error` fails at once
    /// with [`VolumeError::LeaseLost`] (NBD_ESHUTDOWN); `suspend` waits for a renewed
    /// deadline, which a closed gate never gets, so the request stays unanswered until its
    /// connection is dropped.
    pub async fn admit(&self) -> Result<(), VolumeError> {
        loop {
            let mut renewed = pin!(self.renewed.notified());
            // Registered before the check, so a renewal between the check and the wait is
            // not missed.
            renewed.as_mut().enable();
            if self.holds() {
                return Ok(());
            }
            if self.on_loss == OnLeaseLoss::IoError {
                return Err(VolumeError::LeaseLost);
            }
            renewed.await;
        }
    }
}

fn clock(origin: Instant) -> Millis {
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use std::time::Instant;

    use blockrep_frontend::VolumeError;

    use super::{AckGate, OnLeaseLoss};

    /// Polls a future once: whether it has answered without waiting.
    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn no_acknowledgement_after_the_lease_deadline() {
        let gate = AckGate::new(Instant::now(), OnLeaseLoss::IoError);
        let admit = |g: &AckGate| poll_once(std::pin::pin!(g.admit()));
        assert_eq!(admit(&gate), Poll::Ready(Err(VolumeError::LeaseLost)));
        gate.set_deadline(Some(gate.now() + 60_000));
        assert_eq!(admit(&gate), Poll::Ready(Ok(())));
        // A deadline already behind the clock admits nothing.
        gate.set_deadline(Some(gate.now().saturating_sub(1)));
        assert_eq!(admit(&gate), Poll::Ready(Err(VolumeError::LeaseLost)));
        gate.set_deadline(None);
        assert_eq!(admit(&gate), Poll::Ready(Err(VolumeError::LeaseLost)));
        // A closed gate stays closed, whatever the controller publishes after.
        gate.set_deadline(Some(gate.now() + 60_000));
        gate.close();
        gate.set_deadline(Some(gate.now() + 60_000));
        assert!(!gate.holds());
        assert_eq!(admit(&gate), Poll::Ready(Err(VolumeError::LeaseLost)));
    }

    #[tokio::test]
    async fn a_suspended_request_answers_only_once_the_lease_is_renewed() {
        let gate = Arc::new(AckGate::new(Instant::now(), OnLeaseLoss::Suspend));
        let mut held = std::pin::pin!(gate.admit());
        assert!(poll_once(held.as_mut()).is_pending());
        let renewer = gate.clone();
        tokio::spawn(async move { renewer.set_deadline(Some(renewer.now() + 60_000)) });
        assert_eq!(held.await, Ok(()));
    }

    #[test]
    fn a_suspended_request_is_never_answered_by_a_closed_gate() {
        let gate = AckGate::new(Instant::now(), OnLeaseLoss::Suspend);
        let mut held = std::pin::pin!(gate.admit());
        assert!(poll_once(held.as_mut()).is_pending());
        gate.close();
        gate.set_deadline(Some(gate.now() + 60_000));
        assert!(poll_once(held.as_mut()).is_pending());
    }
}
