//! A TCP relay between a client and a target address that a test can cut: how a test takes
//! one node off etcd (or any service) without touching the others. `cut` drops every
//! connection and resets new ones at once (a refused route); `blackhole` keeps connections
//! up but delivers nothing in either direction (a partition that drops packets, seen only as
//! a timeout); `restore` forwards again.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const OPEN: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE: u8 = 2;

struct Shared {
    mode: AtomicU8,
    stop: AtomicBool,
    /// Both ends of every relayed connection, so `cut` can close them.
    streams: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }

    fn close_all(&self) {
        let streams = std::mem::take(&mut *self.streams.lock().unwrap_or_else(|e| e.into_inner()));
        for s in streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

pub struct Relay {
    port: u16,
    target: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let port = listener.local_addr().expect("relay address").port();
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(OPEN),
            stop: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, target, s));
        Relay {
            port,
            target,
            shared,
            accept: Some(accept),
        }
    }

    /// A relay to a loopback port.
    pub fn to_port(port: u16) -> Relay {
        Relay::start(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// `http://127.0.0.1:PORT`, for a client that takes URLs.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Closes every relayed connection; new ones are reset as soon as they are accepted.
    pub fn cut(&self) {
        self.shared.mode.store(CUT, Ordering::SeqCst);
        self.shared.close_all();
    }

    /// Stops delivering bytes, silently, on existing and new connections.
    pub fn blackhole(&self) {
        self.shared.mode.store(BLACKHOLE, Ordering::SeqCst);
    }

    /// Forwards again (connections cut stay closed: clients reconnect).
    pub fn restore(&self) {
        self.shared.mode.store(OPEN, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.close_all();
        // Wakes the blocking accept so the thread sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if shared.mode() == CUT {
            let _ = client.set_linger_zero();
            continue;
        }
        let Ok(server) = TcpStream::connect(target) else {
            continue;
        };
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        {
            let mut streams = shared.streams.lock().unwrap_or_else(|e| e.into_inner());
            streams.push(c3);
            streams.push(s3);
        }
        let (a, b) = (shared.clone(), shared.clone());
        std::thread::spawn(move || pump(client, s2, a));
        std::thread::spawn(move || pump(server, c2, b));
    }
}

/// Copies `from` to `to` until either closes or the relay is cut; in blackhole mode reads
/// and drops.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match shared.mode() {
            OPEN => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            BLACKHOLE => {}
            _ => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// SO_LINGER 0: closing sends a reset, as a refused route would, instead of a clean FIN.
trait LingerZero {
    fn set_linger_zero(&self) -> std::io::Result<()>;
}

impl LingerZero for TcpStream {
    fn set_linger_zero(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
        let r = unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}
