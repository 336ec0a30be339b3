//! blockrep-lazyfs: a FUSE filesystem for power-loss testing.
//!
//! Killing a process keeps the kernel's page cache, so a store that forgets an fdatasync,
//! syncs the wrong file, or renames a file without syncing its directory passes every kill -9
//! test. This crate owns the filesystem that closes that hole (after Jepsen's LazyFS): a
//! pass-through view of a backing directory in which file data written since the file's last
//! fsync/fdatasync lives only in the filesystem's memory, and creating, renaming, linking or
//! unlinking a name becomes durable only when its directory is fsynced. A `crash` command
//! drops every unsynced change (optionally keeping a random, seeded subset of each file's
//! dirty pages: torn and reordered writes) and the view then shows exactly what the backing
//! directory holds.
//!
//! * [`overlay`]: the per-file data model (dirty pages over the backing file), pure logic.
//! * [`state`]: inodes, live and durable namespaces, fsync, crash; no FUSE.
//! * [`fuse`]: the `fuser` adapter.
//! * [`control`]: the control file (`MOUNTPOINT/.lazyfs-control`) and its client side.
//!
//! It is a test tool for blockrep's power-loss tests (`tests/power_loss.rs`); nothing in the
//! product depends on it.

pub mod control;
pub mod fuse;
pub mod overlay;
pub mod state;
mod sys;
