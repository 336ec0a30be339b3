//! `blockrep node`'s control loop: it feeds the sans-IO [`Controller`] with what etcd, the
//! clock and the store say, and carries out its actions.
//!
//! Three tasks: this loop (etcd reads and transactions, one at a time, so a view is never
//! older than a transaction it follows), the keep-alive task (renewals must not wait behind
//! a slow transaction; each records its *send* instant, see [`keep_alive`]), and the role
//! worker (role changes take seconds: promotion, rebuild handshakes, an NBD grace). Only
//! this loop touches a term's [`AckGate`]: it closes it the moment the controller steps
//! down, before the role worker has even heard of it.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use blockrep_control::record::{MemberState, VolumeView};
use blockrep_control::{Action, Controller, Event, FenceReason, Keys, LocalState, NodeConfig};
use blockrep_metrics::ControlReport;
use blockrep_replication::core::{CommitMode, Millis};
use blockrep_storage::{Epoch, Store};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::etcd::{Etcd, EtcdError, LeaseId, Watch, WatchEvent};
use super::gate::{AckGate, OnLeaseLoss};
use super::node::NodeRuntime;
use super::reach::Reachability;
use super::role_worker::{counted_in_sync, role_worker, term_at, LedTerm, RoleCommand, TermSlot};
use crate::observe::VolumeMetrics;

/// How often the loop looks at the clock and the store between etcd events.
const TICK: Duration = Duration::from_millis(100);

/// How often a failsafe term's confirmations are carried to its gate.
const CONFIRM_POLL: Duration = Duration::from_millis(50);

/// The pause before a failed keep-alive is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// What the loop needs besides the controller.
pub struct Loop {
    pub etcd: Etcd,
    pub keys: Keys,
    pub cfg: NodeConfig,
    /// The clock every `Millis` of this node is on (the gates' too).
    pub origin: Instant,
    pub on_lease_loss: OnLeaseLoss,
    /// The replication address in this node's member record.
    pub advertise: String,
    pub nbd: Vec<String>,
    pub admin: Option<String>,
    pub metrics: Arc<VolumeMetrics>,
    /// `GET /v1/primary`'s answer.
    pub leading: Arc<AtomicBool>,
    /// `/v1/status`'s control section.
    pub control: Arc<Mutex<ControlReport>>,
}

/// What the keep-alive task reports.
enum Renewal {
    Answered {
        sent_at: Millis,
        ttl: Millis,
    },
    /// etcd no longer knows the lease: every key on it is gone.
    Lost,
}

struct State {
    node: Loop,
    controller: Controller,
    store: Arc<Store>,
    lease: Option<LeaseId>,
    /// The running primary term's gate.
    gate: Option<Arc<AckGate>>,
    roles: mpsc::UnboundedSender<RoleCommand>,
    /// The primary term the role worker runs, as it last set it.
    term: TermSlot,
    /// The replicas the role worker was last told to replicate to.
    applied: BTreeSet<String>,
    /// A member change waiting until etcd's in-sync set allows it.
    pending: Option<Vec<(String, String)>>,
    last_local: Option<LocalState>,
    last_in_sync: Option<Vec<String>>,
    /// The last `Event::ReplicasConfirmed` fed.
    last_confirmed: Option<Millis>,
    renewals: mpsc::UnboundedSender<Renewal>,
    keeper: Option<tokio::task::JoinHandle<()>>,
    /// Whether the loop's own requests reach etcd (the keep-alive task keeps its own).
    reach: Reachability,
    /// Set when this node's settings are not its volume's, or its name's leader tag is
    /// another's: the loop ends with this error.
    misconfigured: Option<String>,
}

/// Runs the node until `shutdown`; then it steps down, hands the leader key back and
/// revokes its lease, so another node takes over at once rather than after the TTL.
pub async fn run(node: Loop, runtime: NodeRuntime, shutdown: CancellationToken) -> Result<()> {
    let store = runtime.store().clone();
    let (roles, role_rx) = mpsc::unbounded_channel();
    let (failed_tx, mut failed) = mpsc::unbounded_channel();
    let term: TermSlot = Arc::new(Mutex::new(None));
    let worker = tokio::spawn(role_worker(runtime, role_rx, failed_tx, term.clone()));
    let _ = roles.send(RoleCommand::Follow);
    for reason in [
        FenceReason::LeaseExpired,
        FenceReason::LeaderKeyLost,
        FenceReason::HigherEpoch,
        FenceReason::Switchover,
        FenceReason::Shutdown,
    ] {
        node.fence_counter(reason);
    }
    node.metrics
        .metrics
        .failovers
        .with_label_values(&[node.metrics.volume.as_str()]);
    let (renewals, mut renewed) = mpsc::unbounded_channel();
    let controller = Controller::new(node.keys.clone(), node.cfg.clone());
    let mut st = State {
        node,
        controller,
        store,
        lease: None,
        gate: None,
        roles,
        term,
        applied: BTreeSet::new(),
        pending: None,
        last_local: None,
        last_in_sync: None,
        last_confirmed: None,
        renewals,
        keeper: None,
        reach: Reachability::default(),
        misconfigured: None,
    };
    let mut watch: Option<Watch> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(r) = renewed.recv() => st.renewal(r).await,
            Some(w) = next_watch(&mut watch) => {
                if let WatchEvent::Failed(e) = w {
                    tracing::debug!("etcd watch: {e}");
                } else {
                    st.refresh().await;
                }
            }
            Some(epoch) = failed.recv() => st.lead_failed(epoch).await,
            _ = tick.tick() => {
                if st.lease.is_none() {
                    st.grant().await;
                }
                if watch.is_none() {
                    if let Some(revision) = st.refresh().await {
                        watch = Some(st.node.etcd.watch(&st.node.keys, revision));
                    }
                }
                st.tick().await;
            }
        }
        if st.misconfigured.is_some() {
            break;
        }
    }
    st.stop().await;
    let (done, stopped) = oneshot::channel();
    let _ = st.roles.send(RoleCommand::Shutdown(done));
    let _ = stopped.await;
    let _ = worker.await;
    match st.misconfigured {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

async fn next_watch(watch: &mut Option<Watch>) -> Option<WatchEvent> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

impl Loop {
    fn now(&self) -> Millis {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn fence_counter(&self, reason: FenceReason) -> prometheus::IntCounter {
        self.metrics
            .metrics
            .fence_events
            .with_label_values(&[self.metrics.volume.as_str(), reason.label()])
    }
}

impl State {
    /// Feeds `first` and everything its actions lead to (transaction results, fresh views).
    async fn feed(&mut self, first: Event) {
        let mut events = VecDeque::from([first]);
        while let Some(event) = events.pop_front() {
            // An etcd request just awaited may have taken longer than a confirmation lasts.
            self.note_confirmation();
            let actions = self.controller.handle(event);
            self.publish_deadline();
            for action in actions {
                self.act(action, &mut events).await;
            }
        }
        self.publish_deadline();
        self.report();
    }

    /// The gate follows the controller: the deadline `may_acknowledge` holds until while
    /// leading (the lease's, or with failsafe its replicas' confirmation), nothing otherwise.
    fn publish_deadline(&self) {
        if let Some(gate) = &self.gate {
            gate.set_deadline(self.controller.acknowledge_deadline());
        }
    }

    async fn act(&mut self, action: Action, events: &mut VecDeque<Event>) {
        match action {
            Action::Txn { id, txn } => {
                let succeeded = match self.node.etcd.txn(&txn, self.lease).await {
                    Ok(s) => {
                        self.reach.answered();
                        s
                    }
                    Err(e) => {
                        self.reach.failed("etcd transaction", &e);
                        false
                    }
                };
                // The read after the transaction is at or past its revision: the controller
                // never sees a view older than what it just did.
                let view = self.read().await;
                let revision = view.as_ref().map_or(0, |v| v.revision);
                let now = self.node.now();
                events.push_back(Event::TxnDone {
                    now,
                    id,
                    succeeded,
                    revision,
                });
                if let Some(view) = view {
                    events.push_back(Event::View { now, view });
                }
            }
            Action::Lead(election) => {
                let epoch = election.epoch;
                let mut gate = AckGate::new(self.node.origin, self.node.on_lease_loss);
                if self.node.cfg.failsafe {
                    let t = self.controller.timing();
                    gate = gate.hold(t.renew + t.ttl / 8);
                }
                let gate = Arc::new(gate);
                gate.set_deadline(self.controller.acknowledge_deadline());
                if self.node.cfg.failsafe {
                    tokio::spawn(confirmer(
                        gate.clone(),
                        self.term.clone(),
                        epoch,
                        self.node.origin,
                        self.controller.timing().renew,
                    ));
                }
                self.gate = Some(gate.clone());
                self.applied = election.replicas.iter().map(|(n, _)| n.clone()).collect();
                self.pending = None;
                self.last_in_sync = None;
                self.last_confirmed = None;
                self.node.leading.store(true, Ordering::Release);
                let m = &self.node.metrics;
                m.metrics
                    .failovers
                    .with_label_values(&[m.volume.as_str()])
                    .inc();
                tracing::info!("leading the volume at epoch {epoch}");
                self.log_loss_window();
                let _ = self.roles.send(RoleCommand::Lead { election, gate });
            }
            Action::Replicas { replicas } => {
                self.pending = Some(replicas);
                self.apply_pending();
            }
            Action::InSyncRecorded { members } => {
                tracing::info!("in-sync set recorded: {}", members.join(", "));
                self.apply_pending();
            }
            Action::Follow { leader, epoch } => {
                tracing::info!("{leader} leads at epoch {epoch}: replicating from it");
                let _ = self.roles.send(RoleCommand::Follow);
            }
            Action::StepDown { reason } => self.step_down(reason),
            Action::Misconfigured { differences } => {
                self.misconfigured = Some(format!(
                    "the volume at {} in etcd was created with other settings than this \
                     node's: {}. Start every node of a volume with the settings the volume was \
                     created with (docs/OPERATIONS.md, \"Changing a volume's settings\")",
                    self.node.keys.config(),
                    blockrep_control::controller::describe(&differences)
                ));
            }
            Action::NameClash { other, tag } => {
                self.misconfigured = Some(format!(
                    "this node's name, {}, gives the same leader tag ({tag}) as {other}'s, \
                     which the volume at {} in etcd already knows: two nodes with one tag could \
                     be elected at the same epoch after an etcd restore. Start this node with \
                     another --name (docs/OPERATIONS.md, \"Node names\")",
                    self.node.cfg.name,
                    self.node.keys.dir()
                ));
            }
        }
    }

    /// Says once, as the term starts, what the promotion may have lost.
    fn log_loss_window(&self) {
        let Some(w) = self.controller.loss_window() else {
            return;
        };
        let what = format!(
            "loss window {} LSNs: {} last reported head {}, this node's head {}",
            w.lsns, w.old_leader, w.old_head, w.new_head
        );
        if w.lsns == 0 {
            tracing::info!("{what}");
        } else if self.node.cfg.commit == CommitMode::BestEffort.name() {
            tracing::warn!(
                "{what}: writes acknowledged by {} may be lost",
                w.old_leader
            );
        } else {
            tracing::warn!("{what}: writes no FLUSH covered may be lost");
        }
    }

    /// Stops acknowledging now (the gate), then has the worker end the primary term.
    fn step_down(&mut self, reason: FenceReason) {
        if let Some(gate) = self.gate.take() {
            gate.close();
        }
        self.node.leading.store(false, Ordering::Release);
        self.node.fence_counter(reason).inc();
        tracing::warn!("stepping down: {}", reason.label());
        self.applied.clear();
        self.pending = None;
        let _ = self.roles.send(RoleCommand::StepDown);
    }

    /// Applies a change of the volume's members once it drops no replica that etcd's
    /// in-sync set at this epoch still names: until then the next leader could be one that
    /// lacks what this one acknowledged without it.
    fn apply_pending(&mut self) {
        let Some(replicas) = &self.pending else {
            return;
        };
        let next: BTreeSet<String> = replicas.iter().map(|(n, _)| n.clone()).collect();
        let epoch = self.controller.epoch().map(|e| e.0);
        let recorded: Vec<String> = self
            .controller
            .view()
            .and_then(|v| v.insync.as_ref())
            .filter(|s| Some(s.value.epoch) == epoch)
            .map_or_else(Vec::new, |s| s.value.members.clone());
        let blocked = self
            .applied
            .difference(&next)
            .any(|gone| epoch.is_none() || recorded.contains(gone));
        if blocked {
            return;
        }
        let replicas = self.pending.take().unwrap_or_default();
        self.applied = next;
        let _ = self.roles.send(RoleCommand::SetReplicas(replicas));
    }

    async fn read(&mut self) -> Option<VolumeView> {
        let view = match self.node.etcd.read(&self.node.keys).await {
            Ok(v) => {
                self.reach.answered();
                v
            }
            Err(e) => {
                self.reach.failed("reading the volume from etcd", &e);
                return None;
            }
        };
        match VolumeView::parse(&self.node.keys, &view) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!("the volume's keys in etcd: {e}");
                None
            }
        }
    }

    /// Reads the volume and feeds it; the revision read, if etcd answered.
    async fn refresh(&mut self) -> Option<i64> {
        let view = self.read().await?;
        let revision = view.revision;
        let now = self.node.now();
        self.feed(Event::View { now, view }).await;
        Some(revision)
    }

    async fn grant(&mut self) {
        let ttl = Duration::from_millis(self.controller.timing().ttl);
        let sent_at = self.node.now();
        match self.node.etcd.grant(ttl).await {
            Ok((lease, granted)) => {
                self.reach.answered();
                self.lease = Some(lease);
                let granted_ttl = u64::try_from(granted.as_millis()).unwrap_or(u64::MAX);
                let renew = Duration::from_millis(self.controller.timing().renew);
                self.keeper = Some(tokio::spawn(keep_alive(
                    self.node.etcd.clone(),
                    lease,
                    renew,
                    self.node.origin,
                    self.renewals.clone(),
                )));
                self.feed(Event::KeepAlive {
                    sent_at,
                    granted_ttl,
                })
                .await;
            }
            Err(e) => self.reach.failed("granting a lease", &e),
        }
    }

    async fn renewal(&mut self, renewal: Renewal) {
        match renewal {
            Renewal::Answered { sent_at, ttl } => {
                self.feed(Event::KeepAlive {
                    sent_at,
                    granted_ttl: ttl,
                })
                .await
            }
            Renewal::Lost => {
                tracing::warn!("the lease expired in etcd: registering again on a new one");
                self.lease = None;
                let sent_at = self.node.now();
                self.feed(Event::KeepAlive {
                    sent_at,
                    granted_ttl: 0,
                })
                .await;
            }
        }
    }

    /// The worker could not become primary (promotion refused, a port taken): give the
    /// leadership up, all of it, by revoking the lease; the node registers again.
    async fn lead_failed(&mut self, epoch: Epoch) {
        tracing::error!("could not serve as primary at epoch {epoch}: giving the volume up");
        let now = self.node.now();
        self.feed(Event::LeadFailed { now }).await;
        if let Some(gate) = self.gate.take() {
            gate.close();
        }
        self.node.leading.store(false, Ordering::Release);
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        if let Some(lease) = self.lease.take() {
            if let Err(e) = self.node.etcd.revoke(lease).await {
                tracing::warn!("revoking the lease: {e}");
            }
        }
        let sent_at = self.node.now();
        self.feed(Event::KeepAlive {
            sent_at,
            granted_ttl: 0,
        })
        .await;
    }

    async fn tick(&mut self) {
        let now = self.node.now();
        let local = self.local_state();
        if self.last_local.as_ref() != Some(&local) {
            self.last_local = Some(local.clone());
            self.feed(Event::Local { now, local }).await;
        }
        if self.controller.is_leader() {
            let in_sync = self.counted_in_sync();
            if let Some(in_sync) = in_sync {
                if self.last_in_sync.as_ref() != Some(&in_sync) {
                    self.last_in_sync = Some(in_sync.clone());
                    self.feed(Event::Replication { now, in_sync }).await;
                }
            }
        }
        self.feed(Event::Tick { now }).await;
    }

    /// Tells the controller of the replicas' newest confirmation, if there is news: before
    /// every event, so that it never decides on an older one than the gate already has (and
    /// never steps down for want of one that replication holds).
    fn note_confirmation(&mut self) {
        let Some(epoch) = self.controller.epoch() else {
            return;
        };
        let Some(at) = confirmed_at(&self.term, epoch, self.node.origin) else {
            return;
        };
        if self.last_confirmed != Some(at) {
            self.last_confirmed = Some(at);
            // Answered with no action: it only moves the failsafe deadline.
            let _ = self.controller.handle(Event::ReplicasConfirmed { at });
        }
    }

    /// The replicas the running term's replication counts in sync (None before it runs, or
    /// when the worker was refused it).
    fn counted_in_sync(&self) -> Option<Vec<String>> {
        let term = term_at(&self.term, self.controller.epoch()?);
        counted_in_sync(term, self.applied.is_empty())
    }

    fn local_state(&self) -> LocalState {
        let sb = self.store.superblock();
        let volume_id = sb.volume_id.to_string();
        // A store is the volume's once the identity names it: the first node's, blank or
        // not, or one the leader has rebuilt (which takes the volume's id).
        let identity = self.controller.view().and_then(|v| v.identity.as_ref());
        let ours = match identity {
            Some(identity) => identity.volume_id == volume_id,
            None => !self.store.is_blank(),
        };
        let state = if sb.is_rebuilding() {
            MemberState::Rebuilding
        } else if ours {
            MemberState::Ready
        } else {
            MemberState::Starting
        };
        LocalState {
            volume_id,
            size: sb.volume_size,
            state,
            epoch: sb.epoch,
            head: self.store.head(),
            head_epoch: self.store.head_epoch(),
            committed: self.store.committed(),
            replication: self.node.advertise.clone(),
            nbd: self.node.nbd.clone(),
            admin: self.node.admin.clone(),
        }
    }

    /// The status section and the gauges.
    fn report(&self) {
        let now = self.node.now();
        let c = &self.controller;
        let leads = c.is_leader();
        let remaining = leads.then(|| c.lease_remaining(now) as f64 / 1000.0);
        let m = &self.node.metrics;
        let v = [m.volume.as_str()];
        m.metrics.leader.with_label_values(&v).set(i64::from(leads));
        m.metrics
            .lease_remaining
            .with_label_values(&v)
            .set(remaining.unwrap_or(0.0));
        m.metrics
            .failsafe
            .with_label_values(&v)
            .set(i64::from(c.failsafe_active(now)));
        let epoch = c.epoch().map(|e| e.0).or_else(|| {
            c.view()
                .and_then(|v| v.leader.as_ref())
                .map(|l| l.value.epoch)
        });
        let mut report = self.node.control.lock().unwrap_or_else(|p| p.into_inner());
        report.role = if leads { "primary" } else { "replica" }.into();
        report.leader = c.leader().map(str::to_string);
        report.epoch = epoch.unwrap_or(0);
        report.lease_remaining_seconds = remaining;
        report.failsafe = c.failsafe_active(now);
        if let Some(w) = c.loss_window() {
            report.loss_window_lsns = Some(w.lsns);
            report.loss_window_from = Some(w.old_leader.clone());
        }
    }

    /// A clean stop: the controller steps down and resigns, the lease is revoked.
    async fn stop(&mut self) {
        let now = self.node.now();
        self.feed(Event::Shutdown { now }).await;
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        if let Some(lease) = self.lease.take() {
            if let Err(e) = self.node.etcd.revoke(lease).await {
                tracing::warn!("revoking the lease: {e}");
            }
        }
    }
}

/// The primary slot's `confirmed_at` for the term at `epoch`, on the loop's clock (rounded
/// down: never later than the send it stands for).
fn confirmed_at(term: &Mutex<Option<LedTerm>>, epoch: Epoch, origin: Instant) -> Option<Millis> {
    let status = term_at(term, epoch)?.replication?.status();
    // `term_at` picked the worker's term at `epoch`; its driver must say the same epoch
    // (the check `counted_in_sync` makes too).
    if status.epoch != epoch {
        return None;
    }
    let since = status.confirmed_at?.checked_duration_since(origin)?;
    Some(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// A failsafe term's confirmations go to its gate straight from replication, every
/// [`CONFIRM_POLL`], until the gate closes: the control loop may be held up for seconds by
/// an etcd request that hangs (an etcd restarting accepts connections before it answers),
/// longer than the renew interval a confirmation lasts. The rule is the controller's own
/// (`ReplicasConfirmed`: `at + renew`), which the loop also feeds it before every event.
async fn confirmer(
    gate: Arc<AckGate>,
    term: TermSlot,
    epoch: Epoch,
    origin: Instant,
    renew: Millis,
) {
    let mut poll = tokio::time::interval(CONFIRM_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !gate.is_closed() {
        poll.tick().await;
        if let Some(at) = confirmed_at(&term, epoch, origin) {
            gate.confirm(at.saturating_add(renew));
        }
    }
}

/// Renews `lease` every `renew`, reporting each answer with the instant its request was
/// *sent*: etcd restarts the TTL when it receives a keep-alive, which is later, so a
/// deadline counted from the send ends no later than etcd's own expiry.
async fn keep_alive(
    etcd: Etcd,
    lease: LeaseId,
    renew: Duration,
    origin: Instant,
    out: mpsc::UnboundedSender<Renewal>,
) {
    let now = || u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut reach = Reachability::default();
    loop {
        let sent = Instant::now();
        let sent_at = now();
        let next = match etcd.keep_alive(lease).await {
            Ok(ttl) => {
                reach.answered();
                let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                if out.send(Renewal::Answered { sent_at, ttl }).is_err() {
                    return;
                }
                sent + renew
            }
            Err(EtcdError::LeaseNotFound(_)) => {
                let _ = out.send(Renewal::Lost);
                return;
            }
            // Unreachable or slow: retried soon (a refused connection fails at once, so
            // not at once); the deadline keeps counting from the last answered send.
            Err(e) => {
                reach.failed("lease keep-alive", &e);
                sent + RETRY_PAUSE
            }
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
    }
}
