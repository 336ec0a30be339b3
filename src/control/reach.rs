//! Whether etcd answers, said once per outage: while it is out of reach a node retries
//! several requests every 100 ms, and one warning per failed request would bury the two
//! lines an operator needs (when it went, when it came back).

use std::time::Instant;

use super::etcd::EtcdError;

/// One stream of requests to etcd (the control loop's, or the lease keep-alive's).
#[derive(Debug, Default)]
pub struct Reachability {
    /// Since when requests have failed for want of etcd, and how many.
    out: Option<(Instant, u64)>,
}

impl Reachability {
    /// `what` failed with `e`. Failures that only say etcd could not be asked are logged on
    /// the first of an outage; one that could not be asked *yet* (no lease: the node is
    /// registering again on a new one, which it has said) counts within an outage and starts
    /// none; anything else is news every time.
    pub fn failed(&mut self, what: &str, e: &EtcdError) {
        if matches!(e, EtcdError::NoLease(_)) && self.out.is_none() {
            tracing::debug!("{what}: {e}");
            return;
        }
        if !(e.is_unavailable() || matches!(e, EtcdError::NoLease(_))) {
            tracing::warn!("{what}: {e}");
            return;
        }
        match &mut self.out {
            Some((_, failures)) => {
                *failures += 1;
                tracing::debug!("{what}: {e}");
            }
            None => {
                self.out = Some((Instant::now(), 1));
                tracing::warn!("{what}: {e} (retrying; said again when etcd answers)");
            }
        }
    }

    /// A request was answered: if etcd had been out of reach, say for how long.
    pub fn answered(&mut self) {
        if let Some((since, failures)) = self.out.take() {
            tracing::info!(
                "etcd answers again, after {:.1} s and {failures} failed request(s)",
                since.elapsed().as_secs_f64()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> EtcdError {
        EtcdError::Unreachable {
            endpoints: "http://127.0.0.1:1".into(),
            detail: "connection refused".into(),
        }
    }

    #[test]
    fn an_outage_is_one_episode_however_many_requests_fail() {
        let mut r = Reachability::default();
        assert!(r.out.is_none());
        for _ in 0..50 {
            r.failed("reading the volume", &unreachable());
        }
        r.failed(
            "a txn",
            &EtcdError::NoLease("/blockrep/v/members/n1".into()),
        );
        assert_eq!(r.out.map(|(_, n)| n), Some(51));
        r.answered();
        assert!(r.out.is_none());
        r.failed("reading the volume", &unreachable());
        assert_eq!(r.out.map(|(_, n)| n), Some(1), "a new outage counts afresh");
    }

    #[test]
    fn waiting_for_a_new_lease_is_not_an_outage() {
        let mut r = Reachability::default();
        r.failed(
            "a txn",
            &EtcdError::NoLease("/blockrep/v/members/n1".into()),
        );
        assert!(r.out.is_none());
    }

    #[test]
    fn a_refusal_is_not_an_outage() {
        let mut r = Reachability::default();
        let refused = EtcdError::Rejected {
            op: "txn",
            detail: "permission denied".into(),
        };
        r.failed("a txn", &refused);
        assert!(r.out.is_none());
    }
}
