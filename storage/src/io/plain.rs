//! The fallback backend: a few threads doing plain blocking syscalls.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use super::{run_blocking, IoRequest};

const THREADS: usize = 4;

pub(crate) struct PlainBackend {
    tx: Option<mpsc::Sender<IoRequest>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl PlainBackend {
    pub(crate) fn start() -> io::Result<PlainBackend> {
        let (tx, rx) = mpsc::channel::<IoRequest>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(THREADS);
        for i in 0..THREADS {
            let rx = rx.clone();
            threads.push(
                thread::Builder::new()
                    .name(format!("blockrep-io-{i}"))
                    .spawn(move || loop {
                        let next = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        match next {
                            Ok(req) => {
                                let result = run_blocking(&req.op);
                                let _ = req.done.send(result);
                            }
                            Err(_) => return, // every sender dropped
                        }
                    })?,
            );
        }
        Ok(PlainBackend {
            tx: Some(tx),
            threads,
        })
    }

    pub(crate) fn submit(&self, req: IoRequest) {
        let refused = match &self.tx {
            Some(tx) => tx.send(req).err().map(|mpsc::SendError(req)| req),
            None => Some(req),
        };
        if let Some(req) = refused {
            let _ = req.done.send(Err(io::Error::other("I/O threads stopped")));
        }
    }
}

impl Drop for PlainBackend {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
