//! The control plane's drivers: what runs a node of an etcd-led volume.

pub mod gate;
pub mod node;
