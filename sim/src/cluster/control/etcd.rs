//! etcd's side: the in-memory etcd on the true clock, each node's link to it (delay, loss,
//! cuts), the watch that shows every node each change it can see, and etcd's own faults
//! (down, restored from an older snapshot).

use blockrep_control::record::{encode, SwitchoverRequest};
use blockrep_control::{Txn, VolumeView};
use rand::RngExt;

use super::{Answer, ControlEv, Request};
use crate::cluster::Cluster;
use crate::net::NodeId;

impl Cluster {
    /// The link's delay, or None if the message is lost (cut link, etcd down, bad luck).
    fn etcd_link(&mut self, n: NodeId) -> Option<u64> {
        let cp = self.control.as_ref()?;
        let (up, loss, max) = (
            cp.etcd_up && cp.node(n).link_up,
            cp.cfg.etcd_loss,
            cp.cfg.max_etcd_delay,
        );
        if !up || self.rng.random_bool(loss) {
            return None;
        }
        Some(1 + self.rng.random_range(0..max.max(1)))
    }

    pub(super) fn send_to_etcd(&mut self, n: NodeId, req: Request) {
        let Some(inc) = self.control.as_ref().map(|cp| cp.node(n).inc) else {
            return;
        };
        if let Some(d) = self.etcd_link(n) {
            self.control_schedule(d, ControlEv::AtEtcd { node: n, inc, req });
        }
    }

    fn answer(&mut self, n: NodeId, inc: u64, answer: Answer) {
        if let Some(d) = self.etcd_link(n) {
            self.control_schedule(
                d,
                ControlEv::Answer {
                    node: n,
                    inc,
                    answer,
                },
            );
        }
    }

    /// The volume's keys as etcd holds them now.
    fn etcd_view(&mut self) -> Option<VolumeView> {
        let now = self.now;
        let cp = self.control.as_mut()?;
        let range = cp.etcd.range(now, cp.keys.dir());
        VolumeView::parse(&cp.keys, &range).ok()
    }

    /// A request reaches etcd (if etcd is up by then).
    pub(super) fn at_etcd(&mut self, n: NodeId, inc: u64, req: Request) {
        let now = self.now;
        let Some(cp) = self.control.as_mut() else {
            return;
        };
        if !cp.etcd_up {
            return;
        }
        let before = cp.etcd.revision();
        let ttl = cp.cfg.timing.ttl;
        let answer = match req {
            Request::Txn { id, txn } => {
                let lease = cp.nodes[n].lease.filter(|_| cp.nodes[n].inc == inc);
                let (succeeded, revision) = cp
                    .etcd
                    .txn(now, &txn, lease)
                    .unwrap_or((false, cp.etcd.revision()));
                Answer::TxnDone {
                    id,
                    succeeded,
                    revision,
                    view: None,
                }
            }
            Request::KeepAlive { sent, lease } => Answer::KeepAlive {
                sent,
                lease,
                ttl: cp.etcd.keep_alive(now, lease).unwrap_or(0),
            },
            Request::Grant { sent } => Answer::Granted {
                sent,
                lease: cp.etcd.grant(now, ttl),
                ttl,
            },
            Request::Revoke { lease } => {
                cp.etcd.revoke(now, lease);
                self.after_etcd_change(before);
                return;
            }
            Request::Read => match self.etcd_view() {
                Some(view) => Answer::View(Box::new(view)),
                None => return,
            },
        };
        let answer = match answer {
            Answer::TxnDone {
                id,
                succeeded,
                revision,
                ..
            } => Answer::TxnDone {
                id,
                succeeded,
                revision,
                view: self.etcd_view().map(Box::new),
            },
            other => other,
        };
        self.answer(n, inc, answer);
        self.after_etcd_change(before);
    }

    /// If etcd changed since revision `before`, every node's watch shows it the new view.
    fn after_etcd_change(&mut self, before: i64) {
        let Some(cp) = self.control.as_ref() else {
            return;
        };
        if cp.etcd.revision() == before {
            return;
        }
        let Some(view) = self.etcd_view() else {
            return;
        };
        for n in 0..self.nodes.len() {
            let Some(inc) = self.control.as_ref().map(|cp| cp.node(n).inc) else {
                return;
            };
            self.answer(n, inc, Answer::View(Box::new(view.clone())));
        }
    }

    /// etcd expires leases on its own clock.
    pub(super) fn etcd_tick(&mut self) {
        let now = self.now;
        let Some(cp) = self.control.as_mut() else {
            return;
        };
        if !cp.etcd_up {
            return;
        }
        let before = cp.etcd.revision();
        cp.etcd.expire(now);
        self.after_etcd_change(before);
    }

    // ---- faults ------------------------------------------------------------------------

    /// Cuts node `n` from etcd (requests and answers in flight on the link still arrive).
    pub fn cut_from_etcd(&mut self, n: NodeId) {
        if let Some(cp) = self.control.as_mut() {
            cp.nodes[n].link_up = false;
        }
        self.stats.etcd_cuts += 1;
        let name = self.nodes[n].name.clone();
        self.log(format!("fault: {name} is cut from etcd"));
    }

    pub fn reconnect_to_etcd(&mut self, n: NodeId) {
        if let Some(cp) = self.control.as_mut() {
            cp.nodes[n].link_up = true;
        }
    }

    pub fn etcd_down(&mut self) {
        if let Some(cp) = self.control.as_mut() {
            if cp.etcd_up {
                cp.etcd_up = false;
                self.stats.etcd_outages += 1;
                self.log("fault: etcd is down".into());
            }
        }
    }

    /// etcd comes back; like a new etcd leader, it gives every lease its full TTL again.
    pub fn etcd_up(&mut self) {
        let now = self.now;
        if let Some(cp) = self.control.as_mut() {
            if !cp.etcd_up {
                cp.etcd_up = true;
                cp.etcd.refresh_leases(now);
                self.log("etcd is up".into());
            }
        }
    }

    /// Backs etcd up now: a later [`Cluster::restore_etcd`] goes back to this.
    pub fn snapshot_etcd(&mut self) {
        if let Some(cp) = self.control.as_mut() {
            cp.snapshot = Some(cp.etcd.snapshot());
        }
    }

    /// etcd restarts restored from the last snapshot (revisions keep moving forward, leases
    /// get their TTL again): up afterwards, whether it was before or not.
    pub fn restore_etcd(&mut self) {
        let now = self.now;
        let Some(cp) = self.control.as_mut() else {
            return;
        };
        let Some(snapshot) = cp.snapshot.clone() else {
            return;
        };
        cp.etcd.restore(now, &snapshot);
        self.stats.etcd_restores += 1;
        cp.etcd_up = true;
        let before = cp.etcd.revision() - 1;
        self.log("fault: etcd restored from an older snapshot".into());
        self.after_etcd_change(before);
    }

    /// `blockrep ctl failover --to NAME [--force]`: the operator's request, written to etcd.
    pub fn request_failover(&mut self, to: &str, force: bool) {
        let now = self.now;
        let Some(cp) = self.control.as_mut() else {
            return;
        };
        let request = SwitchoverRequest {
            to: to.to_string(),
            from: None,
            failover: true,
            force,
        };
        let txn = Txn::default().put(cp.keys.switchover(), encode(&request));
        let before = cp.etcd.revision();
        if cp.etcd_up && cp.etcd.txn(now, &txn, None).is_ok() {
            self.after_etcd_change(before);
        }
    }

    /// `etcdctl put PREFIX/VOLUME/epoch N`: the runbook's step after a restore when the
    /// nodes that led since the snapshot may be down (docs/OPERATIONS.md, "Restore").
    pub fn operator_sets_epoch_counter(&mut self, epoch: u64) {
        let now = self.now;
        let Some(cp) = self.control.as_mut() else {
            return;
        };
        let txn = Txn::default().put(cp.keys.epoch(), epoch.to_string().into_bytes());
        let before = cp.etcd.revision();
        if cp.etcd_up && cp.etcd.txn(now, &txn, None).is_ok() {
            self.log(format!("operator: etcdctl put epoch {epoch}"));
            self.after_etcd_change(before);
        }
    }

    /// Every node reaches etcd again.
    pub fn reconnect_all_to_etcd(&mut self) {
        for n in 0..self.nodes.len() {
            self.reconnect_to_etcd(n);
        }
    }
}
