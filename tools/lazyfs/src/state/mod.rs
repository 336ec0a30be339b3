//! The filesystem's state: inodes, the live namespace, what of it is durable, and the
//! operations on them. No FUSE here (see `fuse.rs` for the adapter), so the rules can be
//! tested by calling these methods on a temporary backing directory.
//!
//! # Model
//!
//! * Every regular file the view knows holds an open descriptor on a *backing inode* in
//!   BACKING_DIR and an [`Overlay`] of unsynced changes. fsync/fdatasync writes the overlay
//!   into the backing inode; nothing else ever writes file data to BACKING_DIR.
//! * Every directory holds its *live* entries (what the view shows) and its *durable* entries
//!   (what BACKING_DIR holds under it). fsync of the directory makes the durable entries equal
//!   the live ones: it removes, links and renames entries in BACKING_DIR.
//! * Names and data are independent, as in a real filesystem: a file created, written and
//!   fsynced whose directory was never fsynced is lost by a crash; a name made durable for a
//!   file whose data was never fsynced comes back empty.
//! * So that a backing inode survives while no durable name refers to it (a new file, or one
//!   whose only durable name was unlinked), each one also has a hard link in the hidden
//!   BACKING_DIR/.lazyfs-staging; new directories live there until a fsync of their parent
//!   moves them into place. A crash empties the staging directory: what only it held is
//!   gone, exactly like an inode no durable directory entry points to.
//! * A crash drops every overlay (or, torn, writes a random subset of each file's dirty pages
//!   first), forgets every inode and open handle (operations on them fail with EIO from then
//!   on), empties the staging directory, and reloads the view from BACKING_DIR.
//! * Attributes (mode, owner, timestamps) go to BACKING_DIR at once; only data, sizes and
//!   names are lazy.
//!
//! # Where each part lives
//!
//! * `base`: [`State`] itself, its inode and handle tables, and the lookups every
//!   operation goes through.
//! * `inode`: what the view holds per inode and per open handle.
//! * `namespace`: the live names (lookup, create, link, unlink, rename, forget).
//! * `handles`: open handles and the data path through them.
//! * `durability`: file and directory fsync, and the clean unmount.
//! * `crash`: the simulated power loss and the control file's commands.

mod base;
mod crash;
mod durability;
mod handles;
mod inode;
mod namespace;
#[cfg(test)]
mod tests;

pub use base::{Errno, State, CONTROL_INO, CONTROL_NAME, R, ROOT, STAGING_NAME};
pub use crash::{CrashReport, SplitMix};
pub use inode::{Attr, Kind};
