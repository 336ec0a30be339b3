//! The messages: frame header constants, every body, and the errors decoding reports.

use bytes::Bytes;

use blockrep_storage::{Epoch, Lsn, RebuildCursor, VolumeId, WalRecord};

pub const MAGIC: u32 = u32::from_le_bytes(*b"BRRP");
/// 2: `HelloOk` carries the rebuild cursor, `RebuildStart` may resume, `BaseChunk` says what
/// it may reflect.
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 24;
/// One frame never exceeds this (a 32 MiB write plus its framing fits easily).
pub const MAX_BODY: usize = 40 << 20;

/// Bytes of an entry's header inside an `Entries` frame (its payload follows).
pub const ENTRY_HEADER_LEN: usize = 48;
/// The kind byte of an `Entries` frame.
pub(super) const ENTRIES: u8 = 3;

/// Why a receiver refused a frame or a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The frame's epoch is not the receiver's current epoch.
    StaleEpoch,
    /// Another primary already claimed this epoch.
    EpochOwned,
    /// The store belongs to another volume (or has another size).
    WrongVolume,
    /// An entry did not follow the last one received.
    Gap,
    /// The receiver is not a replica (for example a promoted primary).
    NotReplica,
    /// The frame made no sense in this state.
    Protocol,
    /// The receiver's store failed.
    StorageFailed,
    /// An entry or base chunk describes something no honest primary sends (a payload not as
    /// long as its length, a range off the block grid or past the volume's end).
    BadEntry,
    /// The epoch is the last there is: no primary could ever take over from it.
    UnfollowableEpoch,
    /// The receiver's filesystem is full: it took nothing of the refused entry and takes
    /// entries again once space is freed (a new session catches it up).
    NoSpace,
}

impl RejectReason {
    pub(super) fn code(self) -> u16 {
        match self {
            RejectReason::StaleEpoch => 1,
            RejectReason::EpochOwned => 2,
            RejectReason::WrongVolume => 3,
            RejectReason::Gap => 4,
            RejectReason::NotReplica => 5,
            RejectReason::Protocol => 6,
            RejectReason::StorageFailed => 7,
            RejectReason::BadEntry => 8,
            RejectReason::UnfollowableEpoch => 9,
            RejectReason::NoSpace => 10,
        }
    }
    pub(super) fn from_code(c: u16) -> Option<RejectReason> {
        Some(match c {
            1 => RejectReason::StaleEpoch,
            2 => RejectReason::EpochOwned,
            3 => RejectReason::WrongVolume,
            4 => RejectReason::Gap,
            5 => RejectReason::NotReplica,
            6 => RejectReason::Protocol,
            7 => RejectReason::StorageFailed,
            8 => RejectReason::BadEntry,
            9 => RejectReason::UnfollowableEpoch,
            10 => RejectReason::NoSpace,
            _ => return None,
        })
    }
}

/// A store's role as reported to a promotion candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportedRole {
    Primary,
    Replica,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Primary → replica, first frame of a session.
    Hello {
        volume_id: VolumeId,
        volume_size: u64,
        primary_store: VolumeId,
        head: Lsn,
        committed: Lsn,
    },
    /// Replica → primary: the session is accepted; its log ends at `durable` (fsynced), whose
    /// entry was written at `durable_epoch`. Same LSN and epoch means the same history.
    HelloOk {
        replica_store: VolumeId,
        durable: Lsn,
        durable_epoch: Epoch,
        committed: Lsn,
        /// A rebuild began and did not finish: the store's contents are incomplete.
        rebuilding: bool,
        /// How far that rebuild got, durably, if it wrote a cursor.
        cursor: Option<RebuildCursor>,
    },
    /// Primary → replica: entries in LSN order, and the primary's committed LSN.
    Entries {
        committed: Lsn,
        records: Vec<WalRecord>,
    },
    /// Primary → replica: report once everything through `lsn` is durable.
    Barrier { lsn: Lsn, committed: Lsn },
    /// Replica → primary: everything through `durable` is fsynced here.
    BarrierAck { durable: Lsn },
    /// Either way: refused, with the refuser's epoch and a reason for the log.
    Reject {
        reason: RejectReason,
        message: String,
    },
    /// Promotion candidate → member: what do you hold? With `fence`, the member first adopts
    /// the frame's epoch on behalf of that candidate store (persisted), so that the primary it
    /// follows can commit nothing more while the candidate decides.
    Probe { fence: Option<VolumeId> },
    /// Primary → replica: reset to the primary's base at `base` (its history through it),
    /// then take the base image (`BaseChunk`) and the WAL after it (`Entries`).
    /// With `resume`, the replica's cursor at that offset is vouched for: the base below it
    /// is kept, and the base image continues from there.
    RebuildStart {
        base: Lsn,
        history: Vec<(Epoch, Lsn)>,
        resume: Option<u64>,
    },
    /// Primary → replica: base image contents at `offset` (block-aligned); no data = a hole.
    /// They reflect no entry after `reflects` (what the primary's data file could hold).
    BaseChunk {
        offset: u64,
        length: u64,
        reflects: Lsn,
        data: Option<Bytes>,
    },
    /// Primary → replica: the base image is complete; finish once durable through `target`.
    RebuildFinish { target: Lsn },
    /// Replica → primary: the rebuild is finished and durable through `durable`.
    RebuildDone { durable: Lsn },
    /// Primary → replica: our logs share entries through `keep` and differ after it (the
    /// replica holds an old primary's uncommitted tail): discard everything after `keep`.
    Truncate { keep: Lsn },
    /// Replica → primary: the answer to `Truncate`. Its log now ends at `durable` (of
    /// `durable_epoch`); a non-empty `refusal` says why it could not cut (it needs a rebuild).
    Truncated {
        durable: Lsn,
        durable_epoch: Epoch,
        refusal: String,
    },
    /// Member → candidate.
    ProbeReply {
        volume_id: VolumeId,
        store_id: VolumeId,
        role: ReportedRole,
        head: Lsn,
        /// Epoch of the entry at `head`: logs are compared by (head epoch, head).
        head_epoch: Epoch,
        committed: Lsn,
        needs_rebuild: bool,
    },
}

impl Body {
    pub(super) fn kind(&self) -> u8 {
        match self {
            Body::Hello { .. } => 1,
            Body::HelloOk { .. } => 2,
            Body::Entries { .. } => ENTRIES,
            Body::Barrier { .. } => 4,
            Body::BarrierAck { .. } => 5,
            Body::Reject { .. } => 6,
            Body::Probe { .. } => 7,
            Body::ProbeReply { .. } => 8,
            Body::RebuildStart { .. } => 9,
            Body::BaseChunk { .. } => 10,
            Body::RebuildFinish { .. } => 11,
            Body::RebuildDone { .. } => 12,
            Body::Truncate { .. } => 13,
            Body::Truncated { .. } => 14,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Hello { .. } => "hello",
            Body::HelloOk { .. } => "hello-ok",
            Body::Entries { .. } => "entries",
            Body::Barrier { .. } => "barrier",
            Body::BarrierAck { .. } => "barrier-ack",
            Body::Reject { .. } => "reject",
            Body::Probe { .. } => "probe",
            Body::ProbeReply { .. } => "probe-reply",
            Body::RebuildStart { .. } => "rebuild-start",
            Body::BaseChunk { .. } => "base-chunk",
            Body::RebuildFinish { .. } => "rebuild-finish",
            Body::RebuildDone { .. } => "rebuild-done",
            Body::Truncate { .. } => "truncate",
            Body::Truncated { .. } => "truncated",
        }
    }
}

/// A frame: the sender's epoch and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub epoch: Epoch,
    pub body: Body,
}

impl Frame {
    /// Roughly the memory the frame holds while it waits in a queue: its data plus a little.
    pub fn queued_size(&self) -> u64 {
        match &self.body {
            Body::Entries { records, .. } => records
                .iter()
                .map(|r| r.payload.len() as u64 + ENTRY_HEADER_LEN as u64)
                .sum(),
            Body::BaseChunk { data: Some(d), .. } => d.len() as u64 + 64,
            _ => 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame body of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("entry {0} payload checksum mismatch")]
    BadEntryChecksum(u64),
    #[error("entry {lsn} refused: {error}")]
    BadEntry {
        lsn: u64,
        error: super::validate::EntryError,
    },
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        kind: &'static str,
        why: &'static str,
    },
}
