//! The replica core's oracle: a `ReplicaCore` over an in-memory store ([`MemStore`]) taken
//! through a valid handshake, then fed frames the `script` builds from the fuzz input.
//!
//! Every frame goes the way a real one does: encoded, decoded (a frame the decoder refuses
//! closes its connection, as the driver does), then stepped through the core, whose actions
//! are performed on the store; the store's answers (syncs, a finished rebuild, a cut) come
//! back as events when the script says so. Checked after every step:
//! * nothing panics, and the store is never asked for what the real one refuses or crashes
//!   on (an unplaced or gapped append, an epoch going back, base data outside a rebuild);
//! * a frame that fails validation (the decoder refuses it, or the core answers it with a
//!   `Reject`) changes nothing observable: the core's state and the whole store are as before;
//! * the epoch never decreases, nor the committed LSN; the head and durable LSNs only go back
//!   through a rebuild or a cut, and durable never passes head;
//! * what the core reports durable (`BarrierAck`, `HelloOk`) the store has fsynced, and every
//!   frame it sends carries its epoch and survives a round trip;
//! * with no answer outstanding, the core and the store agree (head, head epoch, epoch and
//!   owner, committed, volume, rebuilding).

use std::collections::{BTreeMap, VecDeque};

use arbitrary::Unstructured;
use blockrep_replication::core::replica::{Action, ConnId, Event, ReplicaCore, ReplicaState};
use blockrep_replication::wire::{self, Body, Frame};
use blockrep_storage::{Epoch, Lsn, VolumeId, BLOCK_SIZE};
use bytes::{Bytes, BytesMut};

use super::frames::check_round_trip;
use super::script::{self, Step};
use super::store::MemStore;

pub const VOLUME_SIZE: u64 = 16 * BLOCK_SIZE;
pub const VOLUME: VolumeId = VolumeId([0x56; 16]);
pub const STORE: VolumeId = VolumeId([0x52; 16]);
pub const PRIMARY: VolumeId = VolumeId([0x50; 16]);
pub const OTHER: VolumeId = VolumeId([0x4f; 16]);
/// A volume that is not ours, offered by a stranger.
pub const STRANGER_VOLUME: VolumeId = VolumeId([0x53; 16]);
/// Steps per case at most (a long input is not a longer case beyond this).
pub const MAX_STEPS: usize = 300;

/// How often each outcome was reached.
#[derive(Debug, Default, Clone)]
pub struct ReplicaStats {
    pub cases: u64,
    pub frames: u64,
    pub refused_by_decoder: u64,
    pub refused_by_core: u64,
    pub reasons: BTreeMap<String, u64>,
    pub appended: u64,
    pub acks: u64,
    pub rebuilds: u64,
    pub base_chunks: u64,
    pub cuts: u64,
    pub new_epochs: u64,
    /// Entries or base chunks the store refused for lack of space.
    pub full: u64,
}

/// An answer of the store the core waits for.
#[derive(Debug)]
enum Answer {
    Synced(ConnId),
    Rebuilt(ConnId),
    Cut(Event),
    Closed(ConnId),
}

/// What the oracles compare before and after a step: the core's state and the whole store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub volume_id: VolumeId,
    pub blank: bool,
    pub epoch: Epoch,
    pub epoch_owner: VolumeId,
    pub head: Lsn,
    pub head_epoch: Epoch,
    pub durable: Lsn,
    pub committed: Lsn,
    pub was_primary: bool,
    pub rebuilding: bool,
    pub store: MemStore,
}

/// Whether a step may move the head and durable LSNs back (a rebuild's reset or a cut).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rewind {
    Never,
    Allowed,
}

pub struct Harness {
    pub core: ReplicaCore,
    pub store: MemStore,
    /// The session the script talks through as the primary.
    pub primary: ConnId,
    last_conn: u64,
    answers: VecDeque<Answer>,
    /// The answer to a cut the last frame asked for.
    cut: Option<Answer>,
    /// How many cuts the core has asked for (every other one is answered late).
    cuts_asked: u64,
    /// The store is "full" for every this-many-th entry or base chunk it is handed (it
    /// refuses it, and the rest of its batch, as a full filesystem would), if set.
    full_every: Option<u64>,
    /// Entries and base chunks handed to the store so far.
    handed: u64,
    pub stats: ReplicaStats,
    /// `BLOCKREP_FUZZ_TRACE` set: every step and the actions it caused go to stderr.
    trace: bool,
}

impl Harness {
    /// A replica in a state `u` picks (blank or of our volume, at a small epoch owned by
    /// our primary, another or nobody: a fence reaches blank stores too), perhaps first
    /// refused a stranger's hello, then taken through a valid handshake with our primary.
    pub fn handshaken(u: &mut Unstructured) -> Harness {
        let blank = u.ratio(1, 3).unwrap_or(false);
        let epoch = Epoch(u.int_in_range(0..=3).unwrap_or(0));
        let owner = *u
            .choose(&[PRIMARY, OTHER, VolumeId([0; 16])])
            .unwrap_or(&PRIMARY);
        let volume_id = if blank { VolumeId([0; 16]) } else { VOLUME };
        let state = ReplicaState {
            volume_id,
            volume_size: VOLUME_SIZE,
            store_id: STORE,
            blank,
            epoch,
            epoch_owner: owner,
            head: Lsn::ZERO,
            head_epoch: Epoch(0),
            durable: Lsn::ZERO,
            committed: Lsn::ZERO,
            was_primary: u.arbitrary().unwrap_or(false),
            rebuilding: false,
            cursor: None,
        };
        let mut h = Harness {
            core: ReplicaCore::new(state),
            store: MemStore::new(VOLUME_SIZE, volume_id, epoch, owner),
            primary: ConnId(1),
            last_conn: 1,
            answers: VecDeque::new(),
            cut: None,
            cuts_asked: 0,
            full_every: None,
            handed: 0,
            stats: ReplicaStats::default(),
            trace: std::env::var_os("BLOCKREP_FUZZ_TRACE").is_some(),
        };
        if u.ratio(1, 2).unwrap_or(false) {
            h.refuse_a_stranger(epoch, owner);
        }
        // Our primary may reuse an epoch it owns (or nobody does); otherwise it needs a new one.
        let bump = owner == OTHER || u.ratio(1, 2).unwrap_or(false);
        let at = if bump { epoch.next() } else { epoch };
        h.send(ConnId(1), script::hello(at, Lsn::ZERO));
        h.answer_all();
        assert_eq!(
            h.core.active(),
            Some(ConnId(1)),
            "a valid hello was not accepted"
        );
        assert_eq!(h.core.state().epoch, at);
        if u.ratio(1, 4).unwrap_or(false) {
            h.full_every = Some(u.int_in_range(1..=6).unwrap_or(3));
        }
        h.stats.cases += 1;
        h
    }

    /// A stranger's hello for another volume that the store must refuse: at an epoch our
    /// primary owns, or below the store's. The delivery checks it changed nothing (a blank
    /// store stays blank and joinable).
    fn refuse_a_stranger(&mut self, epoch: Epoch, owner: VolumeId) {
        let at = match (owner == PRIMARY, epoch.0.checked_sub(1)) {
            (true, _) => epoch,
            (false, Some(below)) => Epoch(below),
            (false, None) => return,
        };
        let mut frame = script::hello(at, Lsn::ZERO);
        if let Body::Hello {
            volume_id,
            primary_store,
            ..
        } = &mut frame.body
        {
            *volume_id = STRANGER_VOLUME;
            *primary_store = OTHER;
        }
        self.last_conn = 2;
        self.send(ConnId(2), frame);
        self.answer_all();
        assert_eq!(self.core.active(), None, "a stranger's hello was accepted");
    }

    /// Runs the whole case: steps from `u` until it runs out, then every answer.
    pub fn run(u: &mut Unstructured) -> ReplicaStats {
        let mut h = Harness::handshaken(u);
        for _ in 0..MAX_STEPS {
            if u.is_empty() {
                break;
            }
            let Ok(step) = script::step(&h, u) else {
                break;
            };
            h.apply(step);
            // Mostly the store answers before the next frame, as a driver's would.
            if script::settle(u) {
                h.answer_all();
            }
        }
        h.answer_all();
        h.stats
    }

    /// The highest connection number used so far.
    pub fn conns(&self) -> u64 {
        self.last_conn
    }

    pub fn apply(&mut self, step: Step) {
        if self.trace {
            eprintln!("step: {}", script::describe(&step));
        }
        match step {
            Step::Send { conn, frame } => {
                self.last_conn = self.last_conn.max(conn.0);
                self.send(conn, frame)
            }
            Step::Raw { conn, bytes } => self.deliver(conn, Bytes::from(bytes), "raw bytes"),
            Step::Close(conn) => self.answers.push_back(Answer::Closed(conn)),
            Step::Answer => self.answer_one(),
        }
        if let Some(conn) = self.core.active() {
            self.primary = conn;
        }
    }

    pub fn observe(&self) -> Observed {
        let s = self.core.state();
        Observed {
            volume_id: s.volume_id,
            blank: s.blank,
            epoch: s.epoch,
            epoch_owner: s.epoch_owner,
            head: s.head,
            head_epoch: s.head_epoch,
            durable: s.durable,
            committed: s.committed,
            was_primary: s.was_primary,
            rebuilding: s.rebuilding,
            store: self.store.clone(),
        }
    }

    /// `frame` from `conn`, by way of its bytes.
    pub fn send(&mut self, conn: ConnId, frame: Frame) {
        let mut buf = BytesMut::new();
        wire::encode(&frame, &mut buf);
        self.deliver(conn, buf.freeze(), frame.body.name());
    }

    fn deliver(&mut self, conn: ConnId, bytes: Bytes, what: &str) {
        self.stats.frames += 1;
        let before = self.observe();
        let (actions, refused, rewind) = match wire::decode(bytes) {
            Err(_) => {
                // The driver closes a connection whose bytes do not decode.
                self.stats.refused_by_decoder += 1;
                (self.core.step(Event::Closed { conn }), true, Rewind::Never)
            }
            Ok(frame) => {
                let rewind = match frame.body {
                    Body::RebuildStart { .. } | Body::Truncate { .. } => Rewind::Allowed,
                    _ => Rewind::Never,
                };
                let actions = self.core.step(Event::Received { conn, frame });
                let refused = self.refusal(conn, &actions);
                (actions, refused, rewind)
            }
        };
        self.perform(actions, &before);
        let after = self.observe();
        if refused {
            assert_eq!(before, after, "a refused {what} frame changed the replica");
        }
        self.check_step(&before, &after, rewind);
        if let Some(cut) = self.cut.take() {
            self.answer(cut);
        }
    }

    /// Whether `actions` refuse `conn`'s frame (a `Reject` to it), counted by reason.
    fn refusal(&mut self, conn: ConnId, actions: &[Action]) -> bool {
        for a in actions {
            if let Action::Send {
                conn: to,
                frame:
                    Frame {
                        body: Body::Reject { reason, .. },
                        ..
                    },
            } = a
            {
                if *to == conn {
                    self.stats.refused_by_core += 1;
                    *self.stats.reasons.entry(format!("{reason:?}")).or_default() += 1;
                    return true;
                }
            }
        }
        false
    }

    fn answer_all(&mut self) {
        while !self.answers.is_empty() {
            self.answer_one();
        }
    }

    /// The oldest outstanding answer of the store (or the transport), delivered.
    fn answer_one(&mut self) {
        if let Some(answer) = self.answers.pop_front() {
            self.answer(answer);
        }
    }

    fn answer(&mut self, answer: Answer) {
        if self.trace {
            eprintln!("answer: {answer:?}");
        }
        let before = self.observe();
        let (event, rewind) = match answer {
            Answer::Synced(conn) => {
                let durable = self.store.sync();
                (Event::Synced { conn, durable }, Rewind::Never)
            }
            Answer::Rebuilt(conn) => {
                let durable = self.store.finish_rebuild();
                (Event::RebuildFinished { conn, durable }, Rewind::Never)
            }
            Answer::Cut(event) => (event, Rewind::Allowed),
            Answer::Closed(conn) => (Event::Closed { conn }, Rewind::Never),
        };
        let actions = self.core.step(event);
        self.perform(actions, &before);
        let after = self.observe();
        self.check_step(&before, &after, rewind);
    }

    /// Whether the store refuses the next entry or base chunk it is handed for lack of space.
    fn full_now(&mut self) -> bool {
        self.handed += 1;
        self.full_every
            .is_some_and(|n| self.handed.is_multiple_of(n))
    }

    /// Carries out the core's actions as the driver does, checking what it sends. A store
    /// that is full refuses what it is handed, skips the rest of the batch's appends and
    /// base chunks, and the core hears of it once the batch is done (`StoreRefused`); the
    /// step's check then compares the core's head with the store's.
    fn perform(&mut self, actions: Vec<Action>, before: &Observed) {
        let mut refused = false;
        for action in actions {
            if self.trace {
                eprintln!("    {}", script::describe_action(&action));
            }
            let stores = matches!(action, Action::Append { .. } | Action::ApplyBase { .. });
            if stores && (refused || self.full_now()) {
                refused = true;
                continue;
            }
            match action {
                Action::Send { frame, .. } => self.check_sent(&frame, before),
                Action::Close { conn, .. } => self.answers.push_back(Answer::Closed(conn)),
                Action::AdoptVolume { volume_id } => self.store.adopt_volume(volume_id),
                Action::AdoptEpoch { epoch, owner } => {
                    self.stats.new_epochs += 1;
                    self.store.adopt_epoch(epoch, owner)
                }
                Action::Append { record } => {
                    self.stats.appended += 1;
                    self.store.append(record)
                }
                Action::Sync { conn, .. } => self.answers.push_back(Answer::Synced(conn)),
                Action::SetCommitted { lsn } => self.store.set_committed(lsn),
                Action::BeginRebuild { base, history, .. } => {
                    self.stats.rebuilds += 1;
                    self.store.begin_rebuild(base, history)
                }
                Action::ApplyBase {
                    offset,
                    length,
                    data,
                    ..
                } => {
                    self.stats.base_chunks += 1;
                    self.store.apply_base(offset, length, data)
                }
                Action::FinishRebuild { conn, .. } => self.answers.push_back(Answer::Rebuilt(conn)),
                Action::Truncate { conn, keep } => self.cut(conn, keep),
            }
        }
        if refused {
            self.stats.full += 1;
            let event = Event::StoreRefused {
                head: self.store.head(),
                head_epoch: self.store.head_epoch(),
                no_space: true,
                message: "the store is full".into(),
            };
            let actions = self.core.step(event);
            self.perform(actions, before);
        }
    }

    /// The driver cuts at once; its answer arrives right after the frame that asked for it,
    /// or, every other cut, after the store's other outstanding answers and whatever frames
    /// the script sends meanwhile (the core parks them until the cut is answered).
    fn cut(&mut self, conn: ConnId, keep: Lsn) {
        let refusal = self.store.truncate_after(keep).err();
        if refusal.is_none() {
            self.stats.cuts += 1;
        }
        let answer = Answer::Cut(Event::Truncated {
            conn,
            head: self.store.head(),
            head_epoch: self.store.head_epoch(),
            refusal,
        });
        self.cuts_asked += 1;
        if self.cuts_asked.is_multiple_of(2) {
            self.answers.push_back(answer);
        } else {
            self.cut = Some(answer);
        }
    }

    fn check_sent(&mut self, frame: &Frame, before: &Observed) {
        let epoch = self.core.state().epoch;
        assert!(
            before.epoch <= frame.epoch && frame.epoch <= epoch,
            "sent {frame:?} at an epoch the replica was not at ({} .. {epoch})",
            before.epoch
        );
        match &frame.body {
            Body::BarrierAck { durable } => {
                self.stats.acks += 1;
                assert!(
                    *durable <= self.store.durable,
                    "acknowledged {durable}, the store is durable through {}",
                    self.store.durable
                );
            }
            Body::HelloOk { durable, .. } => assert!(
                *durable <= self.store.durable,
                "hello-ok reports {durable}, the store is durable through {}",
                self.store.durable
            ),
            _ => {}
        }
        check_round_trip(frame);
    }

    /// The oracles every step must keep, `before` and `after` it.
    fn check_step(&self, before: &Observed, after: &Observed, rewind: Rewind) {
        assert!(after.epoch >= before.epoch, "the core's epoch went back");
        assert!(
            after.store.epoch >= before.store.epoch,
            "the store's epoch went back"
        );
        assert!(after.committed >= before.committed, "committed went back");
        if rewind == Rewind::Never {
            assert!(
                after.head >= before.head,
                "head went back: {before:?} -> {after:?}"
            );
            assert!(after.durable >= before.durable, "durable went back");
            assert!(
                after.store.head() >= before.store.head(),
                "the store's head went back"
            );
        }
        assert!(
            after.durable <= after.head,
            "durable passed head: {after:?}"
        );
        if self.answers.is_empty() && self.cut.is_none() {
            self.check_agreement(after);
        }
    }

    /// With no answer outstanding, the core knows its store exactly.
    fn check_agreement(&self, o: &Observed) {
        let s = &o.store;
        let pairs = [
            ("head", o.head.0, s.head().0),
            ("head epoch", o.head_epoch.0, s.head_epoch().0),
            ("epoch", o.epoch.0, s.epoch.0),
            ("committed", o.committed.0, s.committed.0),
        ];
        for (what, core, store) in pairs {
            assert_eq!(core, store, "the core's {what} is not the store's: {o:?}");
        }
        assert!(
            o.durable <= s.durable,
            "the core's durable is not the store's: {o:?}"
        );
        assert_eq!(o.epoch_owner, s.owner, "epoch owner");
        assert_eq!(o.rebuilding, s.rebuilding, "rebuilding");
        if !o.blank {
            assert_eq!(o.volume_id, s.volume_id, "volume");
        }
    }
}
