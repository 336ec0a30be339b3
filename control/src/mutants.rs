//! Deliberate control-plane bugs for proving the simulator's checker can fail.
//!
//! Only with the `mutants` feature; the simulator switches one on at a time. Without the
//! feature, [`active`] is a constant `false` and every check compiles away.

/// A bug the checker must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mutant {
    /// `may_acknowledge` ignores the lease deadline: a leader cut from etcd keeps
    /// acknowledging after etcd has given the key to another node.
    AcknowledgeAfterLeaseDeadline = 1,
    /// A failsafe volume's new leader acknowledges as soon as it is promoted, without the
    /// hold: the old leader, cut from etcd, may still serve on its last confirmation.
    FailsafeWithoutHold = 2,
}

impl Mutant {
    /// The name used on the simulator's command line.
    pub fn name(self) -> &'static str {
        match self {
            Mutant::AcknowledgeAfterLeaseDeadline => "acknowledge-after-lease-deadline",
            Mutant::FailsafeWithoutHold => "failsafe-without-hold",
        }
    }

    pub fn from_name(name: &str) -> Option<Mutant> {
        Mutant::ALL.into_iter().find(|m| m.name() == name)
    }

    pub const ALL: [Mutant; 2] = [
        Mutant::AcknowledgeAfterLeaseDeadline,
        Mutant::FailsafeWithoutHold,
    ];
}

#[cfg(feature = "mutants")]
mod switch {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::Mutant;

    static ACTIVE: AtomicU8 = AtomicU8::new(0);

    /// Switches `m` on (or every mutant off with `None`), for the whole process.
    pub fn set(m: Option<Mutant>) {
        ACTIVE.store(m.map_or(0, |m| m as u8), Ordering::SeqCst);
    }

    pub fn active(m: Mutant) -> bool {
        ACTIVE.load(Ordering::Relaxed) == m as u8
    }
}

#[cfg(feature = "mutants")]
pub use switch::set;

/// Whether mutant `m` is on.
#[cfg(feature = "mutants")]
pub fn active(m: Mutant) -> bool {
    switch::active(m)
}

/// Whether mutant `m` is on: never, in a real build.
#[cfg(not(feature = "mutants"))]
#[inline(always)]
pub const fn active(_: Mutant) -> bool {
    false
}
