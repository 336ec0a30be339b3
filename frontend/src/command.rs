//! Requests decoded once into typed commands.
//!
//! [`Command::parse`] checks everything a request can get wrong without asking the volume:
//! flags its command does not take, a range outside the export, a READ larger than the
//! largest payload, BLOCK_STATUS without a negotiated context, a command that does not
//! exist. Each refusal answers with the error number the NBD spec names for it
//! ([`Refusal::errno`]). What comes out is valid by construction (invariant: *a parsed
//! command's range lies inside the export*), so the code that runs it checks nothing again.
//!
//! Decoding is on the hot path: it allocates nothing and copies nothing; a WRITE payload
//! moves into its command as the same `Bytes`.

use bytes::Bytes;

use crate::codec::Request;
use crate::proto::*;

/// What a request is checked against: the export's size and what the handshake agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub size: u64,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

/// What the reply, the log and the observer need from a request, whether it parsed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub cookie: u64,
    /// The command number as sent (unknown ones included, for the log and the observer).
    pub cmd: u16,
    pub offset: u64,
    pub length: u32,
}

/// A request that passed every check [`Command::parse`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Read {
        offset: u64,
        len: u32,
        /// Don't fragment: one data chunk, no holes (structured replies only).
        df: bool,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        /// The range must stay allocated (no trimming).
        no_hole: bool,
        /// Fail with ENOTSUP rather than zero slowly.
        fast_zero: bool,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        /// One extent, no longer than the request.
        req_one: bool,
    },
    Disconnect,
}

/// Why a request is answered with an error before the volume sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// `flags` holds only the bits `cmd` does not take.
    #[error("flags {flags:#x} not valid for command {cmd}")]
    Flags { cmd: u16, flags: u16 },
    #[error("read past the end of the volume")]
    ReadPastEnd,
    #[error("read larger than the maximum payload")]
    ReadTooLarge,
    #[error("write past the end of the volume")]
    WritePastEnd,
    #[error("trim past the end of the volume")]
    TrimPastEnd,
    #[error("write-zeroes past the end of the volume")]
    WriteZeroesPastEnd,
    #[error("cache past the end of the volume")]
    CachePastEnd,
    #[error("no metadata context was negotiated")]
    NoMetaContext,
    #[error("block status range is empty or past the end")]
    BlockStatusRange,
    #[error("unknown command {0}")]
    UnknownCommand(u16),
}

impl Refusal {
    /// The NBD error the spec asks for: ENOSPC for writes past the end, EOVERFLOW for a read
    /// too large to send, EINVAL for everything else.
    pub(crate) fn errno(self) -> u32 {
        match self {
            Refusal::WritePastEnd | Refusal::WriteZeroesPastEnd => ENOSPC,
            Refusal::ReadTooLarge => EOVERFLOW,
            Refusal::Flags { .. }
            | Refusal::ReadPastEnd
            | Refusal::TrimPastEnd
            | Refusal::CachePastEnd
            | Refusal::NoMetaContext
            | Refusal::BlockStatusRange
            | Refusal::UnknownCommand(_) => EINVAL,
        }
    }
}

/// Flags each command accepts. FUA is harmless on anything (clients do send it on reads).
fn allowed_flags(cmd: u16, structured: bool) -> u16 {
    match cmd {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    }
}

impl Command {
    /// Splits a request into its header and its typed command, or the reason it is refused.
    pub(crate) fn parse(req: Request, limits: &Limits) -> (Header, Result<Command, Refusal>) {
        let header = Header {
            cookie: req.cookie,
            cmd: req.cmd,
            offset: req.offset,
            length: req.length,
        };
        (header, Command::decode(req, limits))
    }

    /// The checks run in the order the server has always run them: DISC before anything
    /// (its flags do not matter, nothing answers it), then flags, then the range, then
    /// limits particular to the command.
    fn decode(req: Request, limits: &Limits) -> Result<Command, Refusal> {
        let Request {
            flags,
            cmd,
            offset,
            length,
            payload,
            ..
        } = req;
        if cmd == CMD_DISC {
            return Ok(Command::Disconnect);
        }
        let unknown = flags & !allowed_flags(cmd, limits.structured);
        if unknown != 0 {
            return Err(Refusal::Flags {
                cmd,
                flags: unknown,
            });
        }
        let has = |flag: u16| flags & flag != 0;
        let fua = has(CMD_FLAG_FUA);
        let len = u64::from(length);
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= limits.size);
        let within = |refusal: Refusal| if inside { Ok(()) } else { Err(refusal) };
        Ok(match cmd {
            CMD_READ => {
                within(Refusal::ReadPastEnd)?;
                if length > MAX_PAYLOAD {
                    return Err(Refusal::ReadTooLarge);
                }
                Command::Read {
                    offset,
                    len: length,
                    df: has(CMD_FLAG_DF),
                }
            }
            CMD_WRITE => {
                within(Refusal::WritePastEnd)?;
                Command::Write {
                    offset,
                    data: payload,
                    fua,
                }
            }
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => {
                within(Refusal::TrimPastEnd)?;
                Command::Trim { offset, len, fua }
            }
            CMD_WRITE_ZEROES => {
                within(Refusal::WriteZeroesPastEnd)?;
                Command::WriteZeroes {
                    offset,
                    len,
                    no_hole: has(CMD_FLAG_NO_HOLE),
                    fast_zero: has(CMD_FLAG_FAST_ZERO),
                    fua,
                }
            }
            CMD_CACHE => {
                within(Refusal::CachePastEnd)?;
                Command::Cache { offset, len }
            }
            CMD_BLOCK_STATUS => {
                if !limits.structured || !limits.base_allocation {
                    return Err(Refusal::NoMetaContext);
                }
                if len == 0 || !inside {
                    return Err(Refusal::BlockStatusRange);
                }
                Command::BlockStatus {
                    offset,
                    len,
                    req_one: has(CMD_FLAG_REQ_ONE),
                }
            }
            other => return Err(Refusal::UnknownCommand(other)),
        })
    }

    /// The byte range the command touches, if it has one.
    #[cfg(test)]
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Command::Read { offset, len, .. } => Some((*offset, u64::from(*len))),
            Command::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            Command::Trim { offset, len, .. }
            | Command::WriteZeroes { offset, len, .. }
            | Command::Cache { offset, len }
            | Command::BlockStatus { offset, len, .. } => Some((*offset, *len)),
            Command::Flush | Command::Disconnect => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;

    fn limits(structured: bool, base_allocation: bool) -> Limits {
        Limits {
            size: SIZE,
            structured,
            base_allocation,
        }
    }

    fn request(cmd: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request::sample(cmd, flags, 42, offset, length)
    }

    fn bad_flags(cmd: u16, flags: u16) -> Refusal {
        Refusal::Flags { cmd, flags }
    }

    #[test]
    fn each_refusal_answers_with_the_spec_errno() {
        let plain = limits(false, false);
        let full = limits(true, true);
        let no_context = limits(true, false);
        let huge = Limits {
            size: u64::MAX,
            ..plain
        };
        #[rustfmt::skip]
        let cases = [
            (CMD_READ, 0, SIZE, 1, plain, Refusal::ReadPastEnd, EINVAL),
            (CMD_READ, 0, u64::MAX, 2, plain, Refusal::ReadPastEnd, EINVAL),
            (CMD_READ, 0, 0, MAX_PAYLOAD + 1, huge, Refusal::ReadTooLarge, EOVERFLOW),
            (CMD_READ, CMD_FLAG_DF, 0, 1, plain, bad_flags(CMD_READ, CMD_FLAG_DF), EINVAL),
            (CMD_WRITE, 0, SIZE - 1, 2, plain, Refusal::WritePastEnd, ENOSPC),
            (CMD_WRITE, 2, 0, 1, plain, bad_flags(CMD_WRITE, CMD_FLAG_NO_HOLE), EINVAL),
            (CMD_TRIM, 0, SIZE, 1, plain, Refusal::TrimPastEnd, EINVAL),
            (CMD_WRITE_ZEROES, 0, SIZE, 1, plain, Refusal::WriteZeroesPastEnd, ENOSPC),
            (CMD_CACHE, 0, SIZE, 1, plain, Refusal::CachePastEnd, EINVAL),
            (CMD_BLOCK_STATUS, 0, 0, 1, no_context, Refusal::NoMetaContext, EINVAL),
            (CMD_BLOCK_STATUS, 0, 0, 0, full, Refusal::BlockStatusRange, EINVAL),
            (CMD_BLOCK_STATUS, 0, SIZE, 1, full, Refusal::BlockStatusRange, EINVAL),
            (99, 0, 0, 1, plain, Refusal::UnknownCommand(99), EINVAL),
            (99, 1 << 7, 0, 1, plain, bad_flags(99, 1 << 7), EINVAL),
        ];
        for (cmd, flags, offset, length, limits, want, errno) in cases {
            let (_, got) = Command::parse(request(cmd, flags, offset, length), &limits);
            let what = format!("cmd {cmd} flags {flags:#x} offset {offset} length {length}");
            assert_eq!(got, Err(want), "{what}");
            assert_eq!(want.errno(), errno, "{what}");
        }
    }

    #[test]
    fn disconnect_and_flush_ignore_the_range_and_disconnect_its_flags() {
        let plain = limits(false, false);
        let (_, disc) = Command::parse(request(CMD_DISC, 0xffff, u64::MAX, u32::MAX), &plain);
        assert_eq!(disc, Ok(Command::Disconnect));
        let (_, flush) = Command::parse(request(CMD_FLUSH, CMD_FLAG_FUA, u64::MAX, 9), &plain);
        assert_eq!(flush, Ok(Command::Flush));
    }

    #[test]
    fn parse_moves_the_write_payload_without_copying() {
        let req = request(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let sent = req.payload.as_ptr();
        let (header, command) = Command::parse(req, &limits(false, false));
        assert_eq!(header.length, 512);
        match command {
            Ok(Command::Write { offset, data, fua }) => {
                assert_eq!((offset, data.len(), fua), (4096, 512, true));
                assert_eq!(data.as_ptr(), sent);
            }
            other => panic!("not a write: {other:?}"),
        }
    }

    #[test]
    fn flags_become_typed_fields() {
        let full = limits(true, true);
        let zeroes = CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA;
        let (_, z) = Command::parse(request(CMD_WRITE_ZEROES, zeroes, 0, 8), &full);
        assert_eq!(
            z,
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 8,
                no_hole: true,
                fast_zero: true,
                fua: true
            })
        );
        let (_, r) = Command::parse(request(CMD_READ, CMD_FLAG_DF, 1, 2), &full);
        assert_eq!(
            r,
            Ok(Command::Read {
                offset: 1,
                len: 2,
                df: true
            })
        );
        let (_, b) = Command::parse(request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 9), &full);
        assert_eq!(
            b,
            Ok(Command::BlockStatus {
                offset: 0,
                len: 9,
                req_one: true
            })
        );
    }

    proptest! {
        /// The invariant the executor relies on: whatever a client sends, a command that
        /// parsed never reaches past the end of the export.
        #[test]
        fn a_parsed_commands_range_lies_inside_the_export(
            cmd in 0u16..10,
            flags in any::<u16>(),
            offset in prop_oneof![0..2 * SIZE, any::<u64>()],
            length in prop_oneof![0u32..70_000, any::<u32>()],
            structured in any::<bool>(),
            base_allocation in any::<bool>(),
        ) {
            let length = if cmd == CMD_WRITE { length % 70_000 } else { length };
            let (header, command) =
                Command::parse(request(cmd, flags, offset, length), &limits(structured, base_allocation));
            prop_assert_eq!((header.cmd, header.offset, header.length), (cmd, offset, length));
            if let Some((offset, len)) = command.ok().and_then(|c| c.range()) {
                prop_assert!(offset.checked_add(len).is_some_and(|end| end <= SIZE));
            }
        }
    }
}
