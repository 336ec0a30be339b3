//! What the server tells an observer (metrics): one call per finished request and per client
//! entering or leaving the transmission phase.

use std::time::Duration;

use crate::proto;

/// An NBD command, for observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Other,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::Cache,
        Op::WriteZeroes,
        Op::BlockStatus,
        Op::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::Cache => "cache",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
            Op::Other => "other",
        }
    }

    pub(crate) fn from_cmd(cmd: u16) -> Op {
        match cmd {
            proto::CMD_READ => Op::Read,
            proto::CMD_WRITE => Op::Write,
            proto::CMD_FLUSH => Op::Flush,
            proto::CMD_TRIM => Op::Trim,
            proto::CMD_CACHE => Op::Cache,
            proto::CMD_WRITE_ZEROES => Op::WriteZeroes,
            proto::CMD_BLOCK_STATUS => Op::BlockStatus,
            _ => Op::Other,
        }
    }
}

/// Told about every request and connection. Called on the request path: implementations must
/// be cheap and must not take a global lock.
pub trait Observer: Send + Sync + 'static {
    /// A request finished; `bytes` is the payload moved (reads and writes), `ok` whether it
    /// succeeded.
    fn request(&self, export: &str, op: Op, bytes: u64, latency: Duration, ok: bool);
    /// A client entered (+1) or left (-1) the transmission phase.
    fn connection(&self, export: &str, delta: i64);
}

/// Observes nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    fn request(&self, _: &str, _: Op, _: u64, _: Duration, _: bool) {}
    fn connection(&self, _: &str, _: i64) {}
}
