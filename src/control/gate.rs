//! The acknowledgement gate: the one place a leader's lease deadline meets its NBD replies.
//!
//! The controller loop publishes the lease deadline (from the send time of the last
//! keep-alive etcd answered, minus the margin) into an [`AckGate`]; [`StoreVolume`] asks it
//! before every acknowledgement: a write, a FUA, a FLUSH, a TRIM, a WRITE_ZEROES, and a read
//! reply too, because a read answered after another node may have taken over could return
//! data older than a write that node has already acknowledged (linearizability). The NBD
//! server asks once more ([`AckGate::holds`], through `BlockVolume::may_acknowledge`) just
//! before a reply goes to the socket, so one admitted in time that then waited (the process
//! was paused) is dropped with its connection instead of sent late.
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
/// `Ok` only while the clock reads before the published deadline (or, once one is
/// published, before the replicas' confirmation a failsafe term feeds it) and the gate is
/// open.
///
/// Invariant (`a_held_gate_admits_nothing_before_its_hold_has_passed`): a gate made with
/// [`AckGate::hold`] admits nothing before `hold` has passed since [`AckGate::start_hold`].
#[derive(Debug)]
pub struct AckGate {
    origin: Instant,
    /// Milliseconds since `origin`; 0 admits nothing.
    deadline: AtomicU64,
    /// A failsafe term's replicas' word, straight from replication ([`AckGate::confirm`]):
    /// acknowledgements may leave before this too, while a deadline is published.
    confirmed: AtomicU64,
    closed: AtomicBool,
    /// Milliseconds since `origin` before which nothing is admitted (see [`AckGate::hold`]).
    not_before: AtomicU64,
    /// The hold [`AckGate::start_hold`] applies, if the gate was made with one.
    hold: Option<Millis>,
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
            confirmed: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            not_before: AtomicU64::new(0),
            hold: None,
            on_loss,
            renewed: Notify::new(),
        }
    }

    /// A gate for a `--failsafe` volume's new primary: it admits nothing until
    /// [`AckGate::start_hold`] is called and `hold` has passed since.
    ///
    /// Why: the previous leader, cut from etcd, may still acknowledge on the failsafe rule
    /// until `renew` after the send time of the last ask its needed replicas answered. Once
    /// this node's promotion is done it answers that leader no more, nor do the members it
    /// fenced (under sync-quorum a majority, which every majority the old leader needs
    /// meets), so that send time is behind us; holding `renew` (plus a margin for clock
    /// rates) from then keeps the two terms' acknowledgements apart, reads included.
    pub fn hold(mut self, hold: Millis) -> AckGate {
        self.hold = Some(hold);
        self.not_before.store(u64::MAX, Ordering::Release);
        self
    }

    /// The promotion is done (nothing the previous primary needs answers it any more): the
    /// hold starts now.
    pub fn start_hold(&self) {
        if let Some(hold) = self.hold {
            self.not_before
                .store(self.now().saturating_add(hold), Ordering::Release);
            self.renewed.notify_waiters();
            tracing::info!(
                "failsafe hold: acknowledging nothing for {hold} ms, until the previous \
                 leader's last confirmation has run out"
            );
        }
    }

    /// The gate's clock: milliseconds since its origin, on the monotonic clock.
    pub fn now(&self) -> Millis {
        clock(self.origin)
    }

    /// Publishes the controller's deadline (`None`: admit nothing, confirmations included).
    /// A closed gate ignores it.
    pub fn set_deadline(&self, deadline: Option<Millis>) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if deadline.is_none() {
            self.confirmed.store(0, Ordering::Release);
        }
        self.deadline
            .store(deadline.unwrap_or(0), Ordering::Release);
        self.renewed.notify_waiters();
    }

    /// The failsafe rule, fed by replication between the controller's updates: every needed
    /// replica answered an ask sent at `at`, so acknowledgements may leave until `until`
    /// (`at + renew`, as the controller's `ReplicasConfirmed` counts). Only raises; ignored
    /// by a closed gate and while no deadline is published.
    pub fn confirm(&self, until: Millis) {
        if self.closed.load(Ordering::Acquire) || self.deadline.load(Ordering::Acquire) == 0 {
            return;
        }
        if self.confirmed.fetch_max(until, Ordering::AcqRel) < until {
            self.renewed.notify_waiters();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends this term: nothing is admitted any more, whatever is published later.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.deadline.store(0, Ordering::Release);
        self.confirmed.store(0, Ordering::Release);
        self.renewed.notify_waiters();
    }

    /// Whether an acknowledgement may leave now.
    pub fn holds(&self) -> bool {
        let now = self.now();
        let deadline = self.deadline.load(Ordering::Acquire);
        let until = match deadline {
            0 => 0,
            d => d.max(self.confirmed.load(Ordering::Acquire)),
        };
        !self.closed.load(Ordering::Acquire)
            && now >= self.not_before.load(Ordering::Acquire)
            && now < until
    }

    /// Waits until an acknowledgement may leave; within a failsafe term's hold it waits, in
    /// either mode. Past the deadline, `io-error` fails at once
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
            // A failsafe term's hold is no lease loss: requests wait it out in either mode.
            let hold = self.not_before.load(Ordering::Acquire);
            let now = self.now();
            if !self.closed.load(Ordering::Acquire) && now < hold {
                if hold == u64::MAX {
                    renewed.await;
                } else {
                    tokio::time::sleep(std::time::Duration::from_millis(hold - now)).await;
                }
                continue;
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
    fn a_confirmation_admits_past_the_lease_deadline_only_while_a_deadline_is_published() {
        // An origin in the past, so that a deadline just behind the clock is not 0.
        let origin = Instant::now()
            .checked_sub(std::time::Duration::from_secs(10))
            .expect("an instant 10 s ago");
        let gate = AckGate::new(origin, OnLeaseLoss::IoError);
        gate.confirm(gate.now() + 60_000);
        assert!(!gate.holds(), "no deadline published yet: nothing");
        gate.set_deadline(Some(gate.now().saturating_sub(1)));
        assert!(!gate.holds(), "the lease deadline has passed");
        gate.confirm(gate.now() + 60_000);
        assert!(gate.holds(), "the replicas' word holds past it");
        gate.confirm(gate.now().saturating_sub(1));
        assert!(gate.holds(), "an older confirmation takes nothing back");
        gate.set_deadline(None);
        assert!(
            !gate.holds(),
            "the controller's None admits nothing, confirmations included"
        );
        gate.set_deadline(Some(gate.now().saturating_sub(1)));
        gate.confirm(gate.now() + 60_000);
        gate.close();
        gate.confirm(gate.now() + 60_000);
        assert!(!gate.holds() && gate.is_closed());
    }

    #[test]
    fn a_held_gate_admits_nothing_before_its_hold_has_passed() {
        let gate = AckGate::new(Instant::now(), OnLeaseLoss::IoError).hold(60_000);
        gate.set_deadline(Some(gate.now() + 120_000));
        assert!(!gate.holds(), "nothing before the hold even starts");
        gate.start_hold();
        assert!(!gate.holds(), "nothing within the hold");
        let short = AckGate::new(Instant::now(), OnLeaseLoss::IoError).hold(0);
        short.set_deadline(Some(short.now() + 60_000));
        short.start_hold();
        assert!(short.holds(), "open once the hold has passed");
        // A gate without a hold is not affected by start_hold.
        let plain = AckGate::new(Instant::now(), OnLeaseLoss::IoError);
        plain.set_deadline(Some(plain.now() + 60_000));
        plain.start_hold();
        assert!(plain.holds());
    }

    #[tokio::test]
    async fn a_request_within_the_hold_waits_it_out_even_under_io_error() {
        let gate = AckGate::new(Instant::now(), OnLeaseLoss::IoError).hold(200);
        gate.set_deadline(Some(gate.now() + 60_000));
        gate.start_hold();
        let mut held = std::pin::pin!(gate.admit());
        assert!(
            poll_once(held.as_mut()).is_pending(),
            "no NBD_ESHUTDOWN in the hold"
        );
        assert_eq!(held.await, Ok(()));
        assert!(gate.now() >= 200);
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
