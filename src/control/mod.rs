//! The control plane's I/O side: everything that talks to etcd, and the node that runs
//! what it decides. The decisions live in the sans-IO `blockrep-control` crate; this module
//! carries them out.
//!
//! It owns the etcd flags ([`args`]), the etcd driver with its typed errors ([`etcd`]), the
//! operator's `blockrep ctl` ([`ctl`]), the acknowledgement gate a leader answers behind
//! ([`gate`]), `blockrep node`'s roles ([`node`]) and how it says etcd went out of reach
//! ([`reach`]). etcd-client is tokio-based, which is
//! why it lives here in the binary and never in `control/`.

pub mod args;
pub mod ctl;
// A few of the driver's helpers (is_unavailable, timeout, the watch revision) have no user
// yet in either `ctl` or `node`.
#[allow(dead_code)]
pub mod etcd;
pub mod gate;
pub mod node;
pub mod node_args;
pub mod node_loop;
pub mod reach;
mod role_worker;
