//! The replica harness's steps, built from the fuzz input with `arbitrary` and biased toward
//! frames an honest primary would nearly send: the session's connection and epoch, the next
//! LSNs, block-aligned ranges inside the volume, payloads as long as their writes, each
//! sometimes wrong (another connection or epoch, a duplicate or a gap, off the grid or past
//! the end, a short payload, a future entry epoch, the last epoch there is).

use arbitrary::{Result, Unstructured};
use blockrep_replication::core::replica::{Action, ConnId};
use blockrep_replication::wire::{Body, Frame, ReportedRole};
use blockrep_storage::{Epoch, Lsn, RecordKind, VolumeId, WalRecord, BLOCK_SIZE};
use bytes::Bytes;

use super::gen::{arbitrary_frame, reason};
use super::replica::{Harness, OTHER, PRIMARY, STORE, VOLUME, VOLUME_SIZE};

const BLOCKS: u64 = VOLUME_SIZE / BLOCK_SIZE;

/// One thing that happens to the replica.
#[derive(Debug)]
pub enum Step {
    /// A typed frame arrives on `conn` (encoded and decoded on the way).
    Send { conn: ConnId, frame: Frame },
    /// Bytes arrive on `conn` as one frame.
    Raw { conn: ConnId, bytes: Vec<u8> },
    /// `conn`'s transport ends.
    Close(ConnId),
    /// The oldest outstanding answer of the store arrives.
    Answer,
}

/// Our primary's hello at `epoch`, its log at `head`.
pub fn hello(epoch: Epoch, head: Lsn) -> Frame {
    Frame {
        epoch,
        body: Body::Hello {
            volume_id: VOLUME,
            volume_size: VOLUME_SIZE,
            primary_store: PRIMARY,
            head,
            committed: Lsn::ZERO,
        },
    }
}

/// `percent` out of 100, from the input.
fn odds(u: &mut Unstructured, percent: u8) -> Result<bool> {
    Ok(u.int_in_range(0u8..=99)? < percent)
}

/// Mostly `likely` (85%), otherwise next to it or anything at all.
fn near(u: &mut Unstructured, likely: u64) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=19)? {
        0 => likely.saturating_sub(u.int_in_range(1..=3)?),
        1 => likely.saturating_add(u.int_in_range(1..=3)?),
        2 => {
            let any = u.arbitrary()?;
            *u.choose(&[0, u64::MAX, u64::MAX - 1, any])?
        }
        _ => likely,
    })
}

/// Whether every outstanding answer arrives before the next step (mostly).
pub fn settle(u: &mut Unstructured) -> bool {
    odds(u, 80).unwrap_or(true)
}

pub fn step(h: &Harness, u: &mut Unstructured) -> Result<Step> {
    let s = h.core.state();
    // With no session, most steps are a reconnect: the rest of the case needs one.
    if h.core.active().is_none() && odds(u, 70)? {
        let epoch = match odds(u, 70)? {
            true => s.epoch,
            false => Epoch(near(u, s.epoch.0.saturating_add(1))?),
        };
        let frame = hello(epoch, Lsn(near(u, s.head.0)?));
        return Ok(Step::Send {
            conn: ConnId(h.conns() + 1),
            frame,
        });
    }
    let conn = match u.int_in_range(0u8..=19)? {
        0 => ConnId(h.conns() + 1),
        1 => ConnId(u.int_in_range(1..=h.conns())?),
        _ => h.primary,
    };
    let epoch = match odds(u, 95)? {
        true => s.epoch,
        false => Epoch(near(u, s.epoch.0)?),
    };
    let body = match u.int_in_range(0u8..=99)? {
        0..=34 => entries(h, u)?,
        35..=46 => Body::Barrier {
            lsn: Lsn(near(u, s.head.0)?),
            committed: lagging(u, s.head)?,
        },
        47..=52 => rebuild_start(h, u)?,
        53..=62 => base_chunk(u)?,
        63..=66 => Body::RebuildFinish {
            target: Lsn(near(u, s.head.0)?),
        },
        67..=72 => {
            let back = u.int_in_range(0..=3)?;
            Body::Truncate {
                keep: Lsn(near(u, s.head.0.saturating_sub(back))?),
            }
        }
        73..=77 => hello_body(u, s.head)?,
        78..=81 => Body::Probe {
            fence: match u.int_in_range(0u8..=3)? {
                0 | 1 => None,
                2 => Some(PRIMARY),
                _ => Some(OTHER),
            },
        },
        82..=85 => unexpected(u)?,
        86..=88 => return Ok(Step::Close(conn)),
        89..=91 => {
            let frame = arbitrary_frame(u)?;
            return Ok(Step::Send { conn, frame });
        }
        92 => {
            let n = u.int_in_range(0..=64)?;
            return Ok(Step::Raw {
                conn,
                bytes: u.bytes(n.min(u.len()))?.to_vec(),
            });
        }
        _ => return Ok(Step::Answer),
    };
    Ok(Step::Send {
        conn,
        frame: Frame { epoch, body },
    })
}

fn entries(h: &Harness, u: &mut Unstructured) -> Result<Body> {
    let s = h.core.state();
    let mut lsn = match u.int_in_range(0u8..=9)? {
        0 => s.head.0.saturating_sub(u.int_in_range(0..=3)?),
        1 => s.head.0.saturating_add(u.int_in_range(2..=4)?),
        2 => u.arbitrary()?,
        _ => s.head.0.saturating_add(1),
    };
    let mut records = Vec::new();
    for _ in 0..u.int_in_range(0..=4)? {
        records.push(record(u, Lsn(lsn), s.epoch)?);
        // Now and then a gap inside the frame.
        lsn = lsn.saturating_add(if odds(u, 5)? { 2 } else { 1 });
    }
    Ok(Body::Entries {
        committed: lagging(u, s.head)?,
        records,
    })
}

/// A primary's committed LSN: a little behind our head, mostly (so a cut has room).
fn lagging(u: &mut Unstructured, head: Lsn) -> Result<Lsn> {
    let behind = u.int_in_range(0..=6)?;
    Ok(Lsn(near(u, head.0.saturating_sub(behind))?))
}

/// A block-aligned range inside the volume, mostly; sometimes off the grid, past the end,
/// empty, or wrapping around `u64`.
fn range(u: &mut Unstructured) -> Result<(u64, u64)> {
    let blocks = u.int_in_range(1..=2)?;
    let block = u.int_in_range(0..=BLOCKS - blocks)?;
    let (offset, length) = (block * BLOCK_SIZE, blocks * BLOCK_SIZE);
    Ok(match u.int_in_range(0u8..=19)? {
        0 => (offset + 512, length),
        1 => (offset, length - 512),
        2 => (offset + VOLUME_SIZE, length),
        3 => (u64::MAX - BLOCK_SIZE + 1, length),
        4 => (offset, 0),
        _ => (offset, length),
    })
}

/// A payload of `n` bytes, rarely one byte short or long.
fn payload(u: &mut Unstructured, n: u64) -> Result<Bytes> {
    let n = match u.int_in_range(0u8..=19)? {
        0 => n.saturating_sub(1),
        1 => n + 1,
        _ => n,
    };
    Ok(Bytes::from(vec![u.arbitrary::<u8>()?; n as usize]))
}

fn record(u: &mut Unstructured, lsn: Lsn, session: Epoch) -> Result<WalRecord> {
    let kind = match u.int_in_range(0u8..=19)? {
        0..=11 => RecordKind::Write,
        12..=13 => RecordKind::Trim,
        14..=16 => RecordKind::WriteZeroes {
            punch: u.arbitrary()?,
        },
        17..=18 => RecordKind::EpochStart,
        _ => RecordKind::Wrap,
    };
    let epoch = match u.int_in_range(0u8..=19)? {
        0 => Epoch(session.0.saturating_sub(1)),
        1 => Epoch(session.0.saturating_add(1)),
        _ => session,
    };
    let (offset, length) = match kind {
        RecordKind::EpochStart if odds(u, 90)? => (0, 0),
        _ => range(u)?,
    };
    let data = match kind {
        RecordKind::Write => payload(u, length)?,
        _ if odds(u, 5)? => payload(u, BLOCK_SIZE)?,
        _ => Bytes::new(),
    };
    let mut r = WalRecord::new(lsn, epoch, kind, offset, length, data);
    if odds(u, 2)? {
        r.payload_crc ^= 1;
    }
    Ok(r)
}

fn rebuild_start(h: &Harness, u: &mut Unstructured) -> Result<Body> {
    let s = h.core.state();
    let base = Lsn(near(u, s.head.0)?);
    let mut history = Vec::new();
    for _ in 0..u.int_in_range(0..=2)? {
        let at = Lsn(u.int_in_range(0..=base.0)?);
        history.push((Epoch(near(u, s.epoch.0)?.min(s.epoch.0 + 1)), at));
    }
    history.sort_by_key(|(_, at)| *at);
    Ok(Body::RebuildStart {
        base,
        history,
        resume: None,
    })
}

fn base_chunk(u: &mut Unstructured) -> Result<Body> {
    let (offset, length) = range(u)?;
    let data = match u.int_in_range(0u8..=9)? {
        0..=5 => Some(payload(u, length)?),
        _ => None,
    };
    Ok(Body::BaseChunk {
        offset,
        length,
        reflects: Lsn::ZERO,
        data,
    })
}

fn hello_body(u: &mut Unstructured, head: Lsn) -> Result<Body> {
    Ok(Body::Hello {
        volume_id: if odds(u, 90)? { VOLUME } else { OTHER },
        volume_size: near(u, VOLUME_SIZE)?,
        primary_store: if odds(u, 80)? { PRIMARY } else { OTHER },
        head: Lsn(near(u, head.0)?),
        committed: Lsn(near(u, head.0)?),
    })
}

/// A frame only a primary or a candidate receives.
fn unexpected(u: &mut Unstructured) -> Result<Body> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 => Body::HelloOk {
            replica_store: STORE,
            durable: Lsn(u.arbitrary()?),
            durable_epoch: Epoch(u.arbitrary()?),
            committed: Lsn(u.arbitrary()?),
            rebuilding: u.arbitrary()?,
            cursor: None,
        },
        1 => Body::BarrierAck {
            durable: Lsn(u.arbitrary()?),
        },
        2 => Body::Reject {
            reason: reason(u)?,
            message: String::from("no"),
        },
        3 => Body::ProbeReply {
            volume_id: VOLUME,
            store_id: VolumeId(u.arbitrary()?),
            role: ReportedRole::Primary,
            head: Lsn(u.arbitrary()?),
            head_epoch: Epoch(u.arbitrary()?),
            committed: Lsn(u.arbitrary()?),
            needs_rebuild: u.arbitrary()?,
        },
        4 => Body::RebuildDone {
            durable: Lsn(u.arbitrary()?),
        },
        _ => Body::Truncated {
            durable: Lsn(u.arbitrary()?),
            durable_epoch: Epoch(u.arbitrary()?),
            refusal: String::new(),
        },
    })
}

/// A step in one line, payloads by length (for `BLOCKREP_FUZZ_TRACE`).
pub fn describe(step: &Step) -> String {
    match step {
        Step::Send { conn, frame } => format!("{} {}", conn.0, describe_frame(frame)),
        Step::Raw { conn, bytes } => format!("{} raw {} bytes", conn.0, bytes.len()),
        Step::Close(conn) => format!("{} close", conn.0),
        Step::Answer => "answer".into(),
    }
}

fn describe_frame(frame: &Frame) -> String {
    let body = match &frame.body {
        Body::Entries { committed, records } => {
            let r: Vec<_> = records
                .iter()
                .map(|r| {
                    format!(
                        "{}@{} {:?} {}+{}",
                        r.lsn, r.epoch, r.kind, r.offset, r.length
                    )
                })
                .collect();
            format!("entries committed {committed} {r:?}")
        }
        Body::BaseChunk {
            offset,
            length,
            reflects: Lsn::ZERO,
            data,
        } => format!(
            "base-chunk {offset}+{length} data {:?}",
            data.as_ref().map(|d| d.len())
        ),
        other => format!("{other:?}"),
    };
    format!("at epoch {}: {body}", frame.epoch)
}

pub fn describe_action(a: &Action) -> String {
    match a {
        Action::Send { conn, frame } => format!("send {} {}", conn.0, describe_frame(frame)),
        Action::Append { record: r } => format!("append {}@{} {:?}", r.lsn, r.epoch, r.kind),
        Action::ApplyBase { offset, length, .. } => format!("apply base {offset}+{length}"),
        other => format!("{other:?}"),
    }
}
