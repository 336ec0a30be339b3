//! The io_uring backend: one thread owns a ring and keeps it busy.
//!
//! Submitters push requests on a channel and ring an eventfd doorbell only when the ring
//! thread is asleep, so a busy ring costs no extra syscall per request. The ring always has a
//! read armed on that eventfd; its completion wakes the thread to pick up new requests.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};

use super::{IoOp, IoRequest};

const RING_ENTRIES: u32 = 256;
/// Never more operations in the kernel than completion slots, so no completion is dropped.
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize;
const DOORBELL: u64 = u64::MAX;

struct Doorbell {
    fd: OwnedFd,
    /// True while the ring thread may be blocked waiting for completions.
    sleeping: AtomicBool,
}

impl Doorbell {
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }
}

pub(crate) struct UringBackend {
    tx: Option<mpsc::Sender<IoRequest>>,
    doorbell: Arc<Doorbell>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UringBackend {
    pub(crate) fn start() -> io::Result<UringBackend> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let doorbell = Arc::new(Doorbell {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let bell = doorbell.clone();
        let thread = thread::Builder::new()
            .name("blockrep-uring".into())
            .spawn(move || RingLoop::new(ring, rx, bell).run())?;
        Ok(UringBackend {
            tx: Some(tx),
            doorbell,
            thread: Some(thread),
        })
    }

    pub(crate) fn submit(&self, req: IoRequest) {
        let refused = match &self.tx {
            Some(tx) => tx.send(req).err().map(|mpsc::SendError(req)| req),
            None => Some(req),
        };
        if let Some(req) = refused {
            let _ = req
                .done
                .send(Err(io::Error::other("io_uring thread stopped")));
            return;
        }
        if self.doorbell.sleeping.load(Ordering::SeqCst) {
            self.doorbell.ring();
        }
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        self.tx.take();
        self.doorbell.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An operation in the kernel, with whatever memory the kernel is pointing into.
struct InFlight {
    req: IoRequest,
    /// Bytes transferred so far (short transfers are resubmitted for the rest).
    done: usize,
    read_buf: Vec<u8>,
    iovecs: Vec<libc::iovec>,
}

struct RingLoop {
    ring: IoUring,
    rx: mpsc::Receiver<IoRequest>,
    doorbell: Arc<Doorbell>,
    bell_buf: Box<[u8; 8]>,
    waiting: VecDeque<IoRequest>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Operations whose SQE could not be queued yet (short-transfer resubmissions).
    resubmit: Vec<usize>,
}

impl RingLoop {
    fn new(ring: IoUring, rx: mpsc::Receiver<IoRequest>, doorbell: Arc<Doorbell>) -> RingLoop {
        RingLoop {
            ring,
            rx,
            doorbell,
            bell_buf: Box::new([0; 8]),
            waiting: VecDeque::new(),
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            resubmit: Vec::new(),
        }
    }

    fn run(mut self) {
        let mut disconnected = false;
        self.arm_doorbell();
        loop {
            disconnected |= self.take_requests();
            self.fill_ring();
            if disconnected && self.in_flight == 0 && self.waiting.is_empty() {
                return;
            }
            // Announce the sleep, then look once more so a request sent just before the
            // announcement is not left waiting for a doorbell nobody rang.
            self.doorbell.sleeping.store(true, Ordering::SeqCst);
            disconnected |= self.take_requests();
            let must_wait = self.waiting.is_empty() || self.in_flight >= MAX_IN_FLIGHT;
            let wait_for = usize::from(must_wait);
            if let Err(e) = self.ring.submit_and_wait(wait_for) {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    tracing::error!("io_uring submit failed: {e}");
                }
            }
            self.doorbell.sleeping.store(false, Ordering::SeqCst);
            self.reap();
        }
    }

    /// Moves queued requests into `waiting`; returns true once every sender is gone.
    fn take_requests(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(req) => self.waiting.push_back(req),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn arm_doorbell(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.doorbell.fd.as_raw_fd()),
            self.bell_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(DOORBELL);
        self.push(&sqe);
    }

    fn push(&mut self, sqe: &squeue::Entry) {
        loop {
            // SAFETY: every pointer in the entry refers to memory owned by `self.slots` (or
            // `bell_buf`), which stays in place until the completion is reaped.
            let pushed = unsafe { self.ring.submission().push(sqe).is_ok() };
            if pushed {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    fn fill_ring(&mut self) {
        for slot in std::mem::take(&mut self.resubmit) {
            let sqe = self.build(slot);
            self.push(&sqe);
        }
        while self.in_flight < MAX_IN_FLIGHT {
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            let read_buf = match &req.op {
                IoOp::Read { len, .. } => Vec::with_capacity(*len),
                _ => Vec::new(),
            };
            let slot = match self.free.pop() {
                Some(i) => i,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            self.slots[slot] = Some(InFlight {
                req,
                done: 0,
                read_buf,
                iovecs: Vec::new(),
            });
            self.in_flight += 1;
            let sqe = self.build(slot);
            self.push(&sqe);
        }
    }

    /// Builds the SQE for the remaining part of the operation in `slot`.
    fn build(&mut self, slot: usize) -> squeue::Entry {
        let f = self.slots[slot].as_mut().expect("slot in use");
        let sqe = match &f.req.op {
            IoOp::Read { file, offset, len } => {
                let remaining = len - f.done;
                // SAFETY: the capacity is `len`, and `done` bytes are already filled.
                let ptr = unsafe { f.read_buf.as_mut_ptr().add(f.done) };
                opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, remaining as u32)
                    .offset(offset + f.done as u64)
                    .build()
            }
            IoOp::Write { file, offset, bufs } => {
                f.iovecs.clear();
                let mut skip = f.done;
                for b in bufs {
                    if skip >= b.len() {
                        skip -= b.len();
                        continue;
                    }
                    f.iovecs.push(libc::iovec {
                        iov_base: b[skip..].as_ptr() as *mut _,
                        iov_len: b.len() - skip,
                    });
                    skip = 0;
                }
                opcode::Writev::new(
                    types::Fd(file.as_raw_fd()),
                    f.iovecs.as_ptr(),
                    f.iovecs.len() as u32,
                )
                .offset(offset + f.done as u64)
                .build()
            }
            IoOp::Allocate {
                file,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fd(file.as_raw_fd()), *len)
                .offset(*offset)
                .mode(mode.flags())
                .build(),
        };
        sqe.user_data(slot as u64)
    }

    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, result) in done {
            if token == DOORBELL {
                self.arm_doorbell();
                continue;
            }
            self.complete(token as usize, result);
        }
    }

    fn complete(&mut self, slot: usize, result: i32) {
        if result == -libc::EINTR || result == -libc::EAGAIN {
            self.resubmit.push(slot);
            return;
        }
        let f = self.slots[slot]
            .as_mut()
            .expect("completion for a slot in use");
        let outcome: Option<io::Result<Bytes>> = if result < 0 {
            Some(Err(io::Error::from_raw_os_error(-result)))
        } else {
            let n = result as usize;
            match &f.req.op {
                IoOp::Read { len, .. } => {
                    f.done += n;
                    if n == 0 || f.done == *len {
                        // n == 0 is end of file: the rest of the range reads as zeroes.
                        let filled = f.done;
                        // SAFETY: the kernel initialised `filled` bytes of the capacity.
                        unsafe { f.read_buf.set_len(filled) };
                        f.read_buf.resize(*len, 0);
                        Some(Ok(Bytes::from(std::mem::take(&mut f.read_buf))))
                    } else {
                        None
                    }
                }
                IoOp::Write { bufs, .. } => {
                    f.done += n;
                    let total: usize = bufs.iter().map(|b| b.len()).sum();
                    if f.done >= total {
                        Some(Ok(Bytes::new()))
                    } else if n == 0 {
                        Some(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "write made no progress",
                        )))
                    } else {
                        None
                    }
                }
                IoOp::Allocate { .. } => Some(Ok(Bytes::new())),
            }
        };
        match outcome {
            None => self.resubmit.push(slot),
            Some(result) => {
                let f = self.slots[slot].take().expect("slot in use");
                self.free.push(slot);
                self.in_flight -= 1;
                let _ = f.req.done.send(result);
            }
        }
    }
}
