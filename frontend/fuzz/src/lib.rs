//! Oracles and input generators for fuzzing blockrep's NBD frontend.
//!
//! Used by two drivers:
//! * the cargo-fuzz targets in `fuzz_targets/` (libFuzzer, nightly), and
//! * the deterministic stable-toolchain harness `frontend/tests/decoder_fuzz.rs`, which pulls
//!   this file in with `#[path]` so that both check exactly the same properties.
//!
//! Because of the second use this file must not use `crate::` paths and may only use crates
//! that `blockrep-frontend` itself depends on (bytes, tokio, tokio-util).
//!
//! What is checked:
//! * [`check_decoder`]: `RequestDecoder` fed a byte stream in arbitrary pieces never panics,
//!   and behaves exactly like a tiny independent model of the 28-byte request framing: it
//!   returns a request as soon as (and only when) a whole frame is buffered, consumes exactly
//!   that frame, returns every header field unchanged, hands out a WRITE payload whose length
//!   is the header's length (and whose bytes are the frame's), re-encodes to the same bytes,
//!   and refuses a bad magic or an over-long WRITE with the right error.
//! * [`Harness::run`]: a real `Server` (on a Unix socket, serving two 1 MiB RAM volumes) fed
//!   an arbitrary client byte stream never panics, never hangs (it closes the connection
//!   after the client half-closes), never passes a volume a range outside it, and during the
//!   handshake answers every complete option, in order, with well-formed replies that end in
//!   ACK or an error; unknown options get `NBD_REP_ERR_UNSUP`; INFO/GO on an existing export
//!   include `NBD_INFO_EXPORT` with the right size; ABORT is acknowledged and the connection
//!   closed. Bytes after a successful GO / EXPORT_NAME exercise the transmission phase
//!   (requests run against the RAM volume); there only "no panic, no hang" is checked.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use blockrep_frontend::proto::*;
use blockrep_frontend::{
    encode_request, BlockVolume, DecodeError, Exports, Extent, ListenAddr, ReadChunk, Request,
    RequestDecoder, Server, VolumeResult,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

/// Size of a transmission request header.
pub const HEADER_LEN: usize = 28;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

// ---------------------------------------------------------------------------------------------
// Request decoder
// ---------------------------------------------------------------------------------------------

/// Counts of what the decoder did, so a harness can show its inputs reach the interesting
/// paths.
#[derive(Debug, Default, Clone, Copy)]
pub struct DecoderStats {
    pub cases: u64,
    pub requests: u64,
    pub writes: u64,
    pub nonempty_writes: u64,
    pub bad_magic: u64,
    pub too_large: u64,
    pub truncated_at_eof: u64,
}

/// Turns a raw fuzz input into (split sizes, stream). Byte 0 says how many split sizes follow
/// (mod 8), one byte each; a split size of 0 means "everything that is left". No split sizes:
/// the whole stream arrives at once.
pub fn split_decoder_input(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = (n as usize % 8).min(rest.len());
    let splits = rest[..n].iter().map(|&b| b as usize).collect();
    (splits, &rest[n..])
}

/// What a correct decoder must do with the bytes buffered from the start of the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Incomplete,
    Complete(usize),
    BadMagic(u32),
    TooLarge(u32),
}

/// The model: an independent reading of the NBD request framing (28-byte header; WRITE is
/// followed by `length` payload bytes, at most `MAX_PAYLOAD`).
fn expect(avail: &[u8]) -> Expect {
    if avail.len() < HEADER_LEN {
        return Expect::Incomplete;
    }
    let magic = be32(&avail[0..4]);
    if magic != REQUEST_MAGIC {
        return Expect::BadMagic(magic);
    }
    let cmd = be16(&avail[6..8]);
    let length = be32(&avail[24..28]);
    let payload = if cmd == CMD_WRITE { length } else { 0 };
    if payload > MAX_PAYLOAD {
        return Expect::TooLarge(payload);
    }
    let need = HEADER_LEN + payload as usize;
    if avail.len() < need {
        Expect::Incomplete
    } else {
        Expect::Complete(need)
    }
}

fn show(r: &Result<Option<Request>, DecodeError>) -> String {
    match r {
        Ok(None) => "Ok(None)".into(),
        Ok(Some(q)) => format!(
            "Ok(Some(cmd {} flags {:#x} cookie {:#x} offset {:#x} length {} payload {} bytes))",
            q.cmd,
            q.flags,
            q.cookie,
            q.offset,
            q.length,
            q.payload.len()
        ),
        Err(e) => format!("Err({e:?})"),
    }
}

/// Checks one decoded request against the exact frame bytes it came from.
fn check_request(req: &Request, frame: &[u8]) {
    assert_eq!(req.flags, be16(&frame[4..6]), "flags changed");
    assert_eq!(req.cmd, be16(&frame[6..8]), "command changed");
    assert_eq!(req.cookie, be64(&frame[8..16]), "cookie changed");
    assert_eq!(req.offset, be64(&frame[16..24]), "offset changed");
    assert_eq!(req.length, be32(&frame[24..28]), "length changed");
    if req.cmd == CMD_WRITE {
        assert_eq!(
            req.payload.len(),
            req.length as usize,
            "WRITE payload length differs from the header's length"
        );
        assert!(
            req.payload[..] == frame[HEADER_LEN..],
            "WRITE payload bytes differ from the frame's"
        );
    } else {
        assert!(
            req.payload.is_empty(),
            "command {} came with a {}-byte payload",
            req.cmd,
            req.payload.len()
        );
    }
    let mut again = BytesMut::new();
    encode_request(req, &mut again);
    assert!(
        again[..] == frame[..],
        "encode_request(decoded) differs from the bytes it was decoded from"
    );
}

/// Feeds `stream` to a fresh `RequestDecoder` in pieces of `splits` (cycled; 0 = the rest)
/// and checks every step against the model, then ends the stream as `FramedRead` does at EOF
/// (`decode_eof`). Panics on any deviation.
pub fn check_decoder(stream: &[u8], splits: &[usize], stats: &mut DecoderStats) {
    stats.cases += 1;
    let mut dec = RequestDecoder;
    let mut buf = BytesMut::new();
    let mut fed = 0usize;
    // Stream offset of the first byte not yet returned as part of a request.
    let mut frame = 0usize;
    let mut sizes = splits.iter().copied().cycle();
    loop {
        let left = stream.len() - fed;
        let n = match sizes.next() {
            None | Some(0) => left,
            Some(n) => n.min(left),
        };
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let want = expect(&stream[frame..fed]);
            let before = buf.len();
            let got = dec.decode(&mut buf);
            match (&got, want) {
                (Ok(Some(req)), Expect::Complete(len)) => {
                    check_request(req, &stream[frame..frame + len]);
                    frame += len;
                    assert_eq!(
                        fed - buf.len(),
                        frame,
                        "decoder consumed the wrong number of bytes"
                    );
                    stats.requests += 1;
                    if req.cmd == CMD_WRITE {
                        stats.writes += 1;
                        if !req.payload.is_empty() {
                            stats.nonempty_writes += 1;
                        }
                    }
                }
                (Ok(None), Expect::Incomplete) => {
                    assert_eq!(
                        buf.len(),
                        before,
                        "decoder consumed bytes without returning a request"
                    );
                    assert!(
                        buf[..] == stream[frame..fed],
                        "decoder changed buffered bytes"
                    );
                    break;
                }
                (Err(DecodeError::BadMagic(m)), Expect::BadMagic(w)) if *m == w => {
                    stats.bad_magic += 1;
                    return;
                }
                (Err(DecodeError::PayloadTooLarge(l)), Expect::TooLarge(w)) if *l == w => {
                    stats.too_large += 1;
                    return;
                }
                _ => panic!(
                    "decoder returned {} where the model expects {want:?}; frame at stream \
                     offset {frame}, {fed} of {} bytes fed; next bytes {:02x?}",
                    show(&got),
                    stream.len(),
                    &stream[frame..fed.min(frame + 40)]
                ),
            }
        }
        if fed == stream.len() {
            break;
        }
    }
    // End of stream: a partial frame is an error, an empty buffer a clean end.
    match dec.decode_eof(&mut buf) {
        Ok(None) => assert!(
            buf.is_empty(),
            "decode_eof left bytes and reported a clean end"
        ),
        Ok(Some(r)) => panic!(
            "decode_eof returned a request decode() had not: {}",
            show(&Ok(Some(r)))
        ),
        Err(_) => {
            assert!(!buf.is_empty(), "decode_eof failed on an empty buffer");
            stats.truncated_at_eof += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake (and, after GO, transmission) against a real server
// ---------------------------------------------------------------------------------------------

/// Size of each RAM volume the harness exports.
pub const VOLUME_SIZE: u64 = 1 << 20;
/// The export names the harness serves (the empty name selects the first).
pub const EXPORT: &str = "blockrep";
pub const OTHER_EXPORT: &str = "second";
/// A connection must be closed by the server this long after the client half-closed.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_OPTION_LEN: usize = 64 << 10;
const BLOCK: u64 = 4096;

/// A RAM volume that reports zero 4 KiB blocks as holes (so structured reads and
/// BLOCK_STATUS produce mixed chunks) and panics when handed a range outside itself, which
/// the server promises never to do.
pub struct MemVolume {
    data: Mutex<Vec<u8>>,
}

impl MemVolume {
    pub fn new() -> MemVolume {
        MemVolume {
            data: Mutex::new(vec![0; VOLUME_SIZE as usize]),
        }
    }

    fn range(&self, op: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        match offset.checked_add(len) {
            Some(end) if end <= VOLUME_SIZE => offset as usize..end as usize,
            _ => panic!(
                "server passed {op} range offset {offset} length {len} outside the \
                 {VOLUME_SIZE}-byte volume"
            ),
        }
    }

    /// Splits `r` at 4 KiB boundaries into (range, all zero) pieces.
    fn pieces(data: &[u8], r: std::ops::Range<usize>) -> Vec<(std::ops::Range<usize>, bool)> {
        let mut out: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
        let mut at = r.start;
        while at < r.end {
            let next = ((at as u64 / BLOCK + 1) * BLOCK).min(r.end as u64) as usize;
            let zero = data[at..next].iter().all(|&b| b == 0);
            match out.last_mut() {
                Some((last, z)) if *z == zero => last.end = next,
                _ => out.push((at..next, zero)),
            }
            at = next;
        }
        out
    }
}

impl Default for MemVolume {
    fn default() -> Self {
        MemVolume::new()
    }
}

impl BlockVolume for MemVolume {
    fn size(&self) -> u64 {
        VOLUME_SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> VolumeResult<Vec<ReadChunk>> {
        let r = self.range("read", offset, len.into());
        let data = self.data.lock().unwrap();
        Ok(MemVolume::pieces(&data, r)
            .into_iter()
            .map(|(p, zero)| {
                if zero {
                    ReadChunk::Zeroes(p.len() as u64)
                } else {
                    ReadChunk::Data(Bytes::copy_from_slice(&data[p]))
                }
            })
            .collect())
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> VolumeResult<()> {
        let r = self.range("write", offset, data.len() as u64);
        self.data.lock().unwrap()[r].copy_from_slice(&data);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        _fast: bool,
        _fua: bool,
    ) -> VolumeResult<()> {
        let r = self.range("write_zeroes", offset, len);
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> VolumeResult<()> {
        let r = self.range("trim", offset, len);
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }

    async fn flush(&self) -> VolumeResult<()> {
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        self.range("cache", offset, len);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        let r = self.range("block_status", offset, len);
        let data = self.data.lock().unwrap();
        Ok(MemVolume::pieces(&data, r)
            .into_iter()
            .map(|(p, zero)| Extent {
                length: p.len() as u64,
                hole: zero,
                zero,
            })
            .collect())
    }
}

thread_local! {
    static PANICKED: Cell<bool> = const { Cell::new(false) };
}

/// Remembers, per thread, that a panic happened, then runs the previous hook (which prints
/// the message, or under libFuzzer aborts). The server's tasks run on the thread that calls
/// [`Harness::run`] (current-thread runtime), and tokio swallows panics in tasks, so this is
/// how a panic in a connection task is noticed.
fn install_panic_flag() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.with(|p| p.set(true));
            prev(info);
        }));
    });
}

/// What the transcripts reached, over all cases.
#[derive(Debug, Default, Clone, Copy)]
pub struct HandshakeStats {
    pub cases: u64,
    /// Cases the server ended right after its greeting (short or bad client flags).
    pub greeting_only: u64,
    /// Complete options sent by clients and answered.
    pub options: u64,
    pub acks: u64,
    pub errors: u64,
    pub unsupported: u64,
    /// Cases that reached the transmission phase (GO acknowledged, or EXPORT_NAME).
    pub transmission: u64,
    pub aborts: u64,
}

const SOCKET_PREFIX: &str = "blockrep-fuzz-";

/// Removes socket files left in the temp dir by harnesses of processes that are gone (a
/// libFuzzer run exits without dropping its harness).
fn sweep_stale_sockets() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(SOCKET_PREFIX)) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A running server and a runtime to talk to it.
pub struct Harness {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<Result<(), blockrep_frontend::ServerError>>>,
    pub stats: HandshakeStats,
}

impl Harness {
    pub fn new() -> Harness {
        install_panic_flag();
        sweep_stale_sockets();
        static N: AtomicUsize = AtomicUsize::new(0);
        let socket = std::env::temp_dir().join(format!(
            "{SOCKET_PREFIX}{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut exports = Exports::new();
        exports.add(EXPORT, Arc::new(MemVolume::new()));
        exports.add(OTHER_EXPORT, Arc::new(MemVolume::new()));
        let server = rt
            .block_on(Server::bind(&[ListenAddr::Unix(socket.clone())]))
            .expect("bind the fuzz server");
        let shutdown = CancellationToken::new();
        let server = rt.spawn(server.run(exports, shutdown.clone()));
        Harness {
            rt,
            socket,
            shutdown,
            server: Some(server),
            stats: HandshakeStats::default(),
        }
    }

    /// Sends `client` as one connection's whole byte stream, half-closes, collects what the
    /// server sends until it closes, and checks it. Panics on any violation.
    pub fn run(&mut self, client: &[u8]) {
        PANICKED.with(|p| p.set(false));
        let socket = self.socket.clone();
        let input = client.to_vec();
        let reply = self.rt.block_on(async move {
            let stream = tokio::net::UnixStream::connect(&socket)
                .await
                .expect("connect to the fuzz server");
            let (mut r, mut w) = stream.into_split();
            let send = async move {
                // The server may hang up first (that is checked below); ignore EPIPE.
                let _ = w.write_all(&input).await;
                let _ = w.shutdown().await;
            };
            let recv = async move {
                let mut out = Vec::new();
                let res = r.read_to_end(&mut out).await;
                (out, res)
            };
            tokio::time::timeout(CASE_TIMEOUT, async { tokio::join!(send, recv).1 }).await
        });
        if PANICKED.with(|p| p.get()) {
            panic!(
                "the server panicked (message above) on client input {:02x?}",
                &client[..client.len().min(256)]
            );
        }
        let (out, _read_result) = reply.unwrap_or_else(|_| {
            panic!(
                "the server did not close the connection within {CASE_TIMEOUT:?} after the \
                 client finished sending {:02x?}",
                &client[..client.len().min(256)]
            )
        });
        // A read error (ECONNRESET) is acceptable: the server may hang up while bytes are
        // still unread; what arrived before is checked.
        check_transcript(client, &out, &mut self.stats);
        self.stats.cases += 1;
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), server).await });
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

const KNOWN_OPTIONS: [u32; 9] = [
    OPT_EXPORT_NAME,
    OPT_ABORT,
    OPT_LIST,
    OPT_STARTTLS,
    OPT_INFO,
    OPT_GO,
    OPT_STRUCTURED_REPLY,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
];

/// Name requested by an INFO/GO payload, if it parses.
fn info_go_export(data: &[u8]) -> Option<String> {
    if data.len() < 4 {
        return None;
    }
    let n = be32(data) as usize;
    let name = data.get(4..4usize.checked_add(n)?)?;
    String::from_utf8(name.to_vec()).ok()
}

/// Checks the server's side of the handshake against the client's bytes (see the module
/// doc). `server` is everything the server sent before closing.
pub fn check_transcript(client: &[u8], server: &[u8], stats: &mut HandshakeStats) {
    let ctx = || {
        format!(
            "client sent {:02x?}{}",
            &client[..client.len().min(200)],
            if client.len() > 200 { "..." } else { "" }
        )
    };
    assert!(
        server.len() >= 18
            && be64(&server[0..8]) == NBDMAGIC
            && be64(&server[8..16]) == IHAVEOPT
            && be16(&server[16..18]) & FLAG_FIXED_NEWSTYLE != 0,
        "bad or missing greeting {:02x?}; {}",
        &server[..server.len().min(18)],
        ctx()
    );
    let mut s = &server[18..];
    if client.len() < 4 || be32(client) & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        assert!(
            s.is_empty(),
            "server sent {} bytes after the greeting to a client with short or invalid \
             flags; {}",
            s.len(),
            ctx()
        );
        stats.greeting_only += 1;
        return;
    }
    let mut c = &client[4..];
    let mut index = 0;
    loop {
        // The next complete, well-framed option, or the end of what the server must answer.
        if c.len() < 16 || be64(c) != IHAVEOPT {
            break;
        }
        let opt = be32(&c[8..12]);
        let len = be32(&c[12..16]) as usize;
        if len > MAX_OPTION_LEN || c.len() - 16 < len {
            break;
        }
        let data = &c[16..16 + len];
        c = &c[16 + len..];
        index += 1;
        stats.options += 1;
        if opt == OPT_EXPORT_NAME {
            // Either the export info and transmission, or a hang-up: both are legal.
            stats.transmission += 1;
            return;
        }
        let mut saw_export_info = false;
        let kind = loop {
            assert!(
                s.len() >= 20,
                "no complete reply to option {opt} (option #{index}); the server sent \
                 {:02x?} and closed; {}",
                s,
                ctx()
            );
            assert_eq!(
                be64(s),
                REPLY_OPT_MAGIC,
                "bad reply magic for option {opt} (#{index}); {}",
                ctx()
            );
            assert_eq!(
                be32(&s[8..12]),
                opt,
                "reply names another option than the client's option #{index}; {}",
                ctx()
            );
            let kind = be32(&s[12..16]);
            let rlen = be32(&s[16..20]) as usize;
            assert!(
                s.len() - 20 >= rlen,
                "truncated reply to option {opt} (#{index}); {}",
                ctx()
            );
            let body = &s[20..20 + rlen];
            s = &s[20 + rlen..];
            match kind {
                REP_ACK => break kind,
                k if k & 0x8000_0000 != 0 => break kind,
                REP_SERVER => {
                    assert_eq!(opt, OPT_LIST, "NBD_REP_SERVER to option {opt}; {}", ctx())
                }
                REP_INFO => {
                    assert!(
                        opt == OPT_INFO || opt == OPT_GO,
                        "NBD_REP_INFO to option {opt}; {}",
                        ctx()
                    );
                    assert!(body.len() >= 2, "NBD_REP_INFO without a type; {}", ctx());
                    if be16(body) == INFO_EXPORT {
                        assert_eq!(body.len(), 12, "NBD_INFO_EXPORT length; {}", ctx());
                        assert_eq!(be64(&body[2..10]), VOLUME_SIZE, "export size; {}", ctx());
                        saw_export_info = true;
                    }
                }
                REP_META_CONTEXT => assert!(
                    opt == OPT_LIST_META_CONTEXT || opt == OPT_SET_META_CONTEXT,
                    "NBD_REP_META_CONTEXT to option {opt}; {}",
                    ctx()
                ),
                other => panic!(
                    "reply type {other:#x} to option {opt} (#{index}) is not a known \
                     non-final reply; {}",
                    ctx()
                ),
            }
        };
        if kind == REP_ACK {
            stats.acks += 1;
        } else {
            stats.errors += 1;
        }
        if !KNOWN_OPTIONS.contains(&opt) {
            assert_eq!(
                kind,
                REP_ERR_UNSUP,
                "unknown option {opt} must get NBD_REP_ERR_UNSUP; {}",
                ctx()
            );
            stats.unsupported += 1;
        }
        if (opt == OPT_INFO || opt == OPT_GO) && kind == REP_ACK {
            assert!(
                saw_export_info,
                "INFO/GO acknowledged without NBD_INFO_EXPORT; {}",
                ctx()
            );
            let name = info_go_export(data).unwrap_or_default();
            assert!(
                name.is_empty() || name == EXPORT || name == OTHER_EXPORT,
                "INFO/GO acknowledged for unknown export {name:?}; {}",
                ctx()
            );
        }
        if opt == OPT_ABORT {
            assert_eq!(kind, REP_ACK, "ABORT not acknowledged; {}", ctx());
            assert!(s.is_empty(), "server kept talking after ABORT; {}", ctx());
            stats.aborts += 1;
            return;
        }
        if opt == OPT_GO && kind == REP_ACK {
            stats.transmission += 1;
            return;
        }
    }
    assert!(
        s.is_empty(),
        "server sent {} bytes ({:02x?}) the client's options do not account for; {}",
        s.len(),
        &s[..s.len().min(64)],
        ctx()
    );
}

// ---------------------------------------------------------------------------------------------
// Generators for the deterministic harness (structure-aware random inputs)
// ---------------------------------------------------------------------------------------------

pub mod gen {
    use super::*;

    /// SplitMix64: tiny, deterministic, good enough for test inputs.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed)
        }
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in 0..n (n > 0).
        pub fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
        /// True with probability pct/100.
        pub fn pct(&mut self, pct: u64) -> bool {
            self.below(100) < pct
        }
        pub fn bytes(&mut self, n: usize) -> Vec<u8> {
            let mut out = Vec::with_capacity(n + 8);
            while out.len() < n {
                out.extend_from_slice(&self.next_u64().to_le_bytes());
            }
            out.truncate(n);
            out
        }
        /// `min + below(spread)` random bytes.
        pub fn junk(&mut self, min: usize, spread: u64) -> Vec<u8> {
            let n = min + self.below(spread) as usize;
            self.bytes(n)
        }
    }

    fn put_header(out: &mut Vec<u8>, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&cmd.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }

    /// One transmission request, mostly well-formed. `in_volume` keeps offsets and lengths
    /// mostly inside a `VOLUME_SIZE` volume (for the server harness).
    pub fn request(rng: &mut Rng, out: &mut Vec<u8>, in_volume: bool) {
        let cmd: u16 = match rng.below(20) {
            0..=7 => CMD_WRITE,
            8..=11 => CMD_READ,
            12..=18 => rng.below(8) as u16,
            _ => rng.next_u64() as u16,
        };
        let flags: u16 = match rng.below(10) {
            0..=5 => 0,
            6..=8 => 1 << rng.below(5),
            _ => rng.next_u64() as u16,
        };
        let cookie = rng.next_u64();
        let (offset, len) = if in_volume && rng.pct(85) {
            let off = match rng.below(4) {
                0 => 0,
                1 => rng.below(VOLUME_SIZE / BLOCK) * BLOCK,
                _ => rng.below(VOLUME_SIZE),
            };
            let max = (VOLUME_SIZE - off).min(if cmd == CMD_WRITE { 8192 } else { 65536 });
            let len = match rng.below(6) {
                0 => 0,
                1 => max,
                2 => BLOCK.min(max),
                _ => rng.below(max + 1),
            };
            (off, len as u32)
        } else if in_volume && rng.pct(70) {
            // Just past the end, or wrapping around.
            let off = match rng.below(3) {
                0 => VOLUME_SIZE - rng.below(BLOCK),
                1 => VOLUME_SIZE + rng.below(2),
                _ => u64::MAX - rng.below(BLOCK),
            };
            (off, rng.below(2 * BLOCK) as u32 + 1)
        } else {
            let len = match rng.below(10) {
                0..=5 => rng.below(600) as u32,
                6 => MAX_PAYLOAD,
                7 => MAX_PAYLOAD + 1 + rng.below(16) as u32,
                8 => u32::MAX - rng.below(4) as u32,
                _ => rng.next_u64() as u32,
            };
            (rng.next_u64() >> rng.below(64), len)
        };
        put_header(out, flags, cmd, cookie, offset, len);
        if cmd == CMD_WRITE {
            // Whole payload when it is small; a prefix otherwise (the stream then ends
            // mid-payload, which is the interesting case for a huge length anyway).
            let n = if len <= 8192 {
                len as usize
            } else {
                rng.below(4096) as usize
            };
            out.extend(rng.bytes(n));
        }
    }

    /// Mutates a stream a little: flip a byte, cut it short, or splice in garbage.
    pub fn mutate(rng: &mut Rng, out: &mut Vec<u8>) {
        if out.is_empty() {
            return;
        }
        match rng.below(3) {
            0 => {
                let i = rng.below(out.len() as u64) as usize;
                out[i] ^= 1 << rng.below(8);
            }
            1 => {
                let n = rng.below(out.len() as u64) as usize;
                out.truncate(n);
            }
            _ => {
                let i = rng.below(out.len() as u64) as usize;
                let junk = rng.junk(1, 8);
                out.splice(i..i, junk);
            }
        }
    }

    /// A decoder case: (stream, split sizes).
    pub fn decoder_case(rng: &mut Rng) -> (Vec<u8>, Vec<usize>) {
        let mut stream = Vec::new();
        match rng.below(20) {
            // Pure garbage.
            0 => stream = rng.junk(0, 200),
            _ => {
                for _ in 0..rng.below(8) {
                    request(rng, &mut stream, false);
                }
                if rng.pct(25) {
                    mutate(rng, &mut stream);
                }
            }
        }
        let splits = (0..rng.below(6))
            .map(|_| match rng.below(10) {
                0 => 0,
                1..=6 => rng.below(32) as usize + 1,
                _ => rng.below(1024) as usize + 1,
            })
            .collect();
        (stream, splits)
    }

    fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    fn name(rng: &mut Rng) -> Vec<u8> {
        match rng.below(6) {
            0 => Vec::new(),
            1 | 2 => EXPORT.as_bytes().to_vec(),
            3 => OTHER_EXPORT.as_bytes().to_vec(),
            4 => b"nope".to_vec(),
            _ => rng.junk(0, 20),
        }
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// A whole client byte stream: flags, options, and after a GO, transmission requests.
    pub fn handshake_case(rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        let flags: u32 = match rng.below(20) {
            0..=13 => FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
            14..=16 => FLAG_C_FIXED_NEWSTYLE,
            17 => 0,
            _ => rng.next_u64() as u32,
        };
        out.extend_from_slice(&flags.to_be_bytes());
        let mut went = false;
        for _ in 0..rng.below(7) {
            let mut data = Vec::new();
            let opt = match rng.below(24) {
                0..=3 => {
                    string(&mut data, &name(rng));
                    let n = rng.below(5);
                    data.extend_from_slice(&(n as u16).to_be_bytes());
                    for _ in 0..n {
                        let t = if rng.pct(80) {
                            rng.below(4)
                        } else {
                            rng.next_u64()
                        };
                        data.extend_from_slice(&(t as u16).to_be_bytes());
                    }
                    if rng.pct(70) {
                        went = true;
                        OPT_GO
                    } else {
                        OPT_INFO
                    }
                }
                4..=6 => OPT_STRUCTURED_REPLY,
                7..=10 => {
                    string(&mut data, &name(rng));
                    let queries: Vec<Vec<u8>> = (0..rng.below(4))
                        .map(|_| match rng.below(5) {
                            0 | 1 => b"base:allocation".to_vec(),
                            2 => b"base:".to_vec(),
                            3 => b"qemu:dirty-bitmap:x".to_vec(),
                            _ => rng.junk(0, 12),
                        })
                        .collect();
                    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
                    for q in &queries {
                        string(&mut data, q);
                    }
                    if rng.pct(60) {
                        OPT_SET_META_CONTEXT
                    } else {
                        OPT_LIST_META_CONTEXT
                    }
                }
                11 | 12 => OPT_LIST,
                13 => OPT_ABORT,
                14 => OPT_STARTTLS,
                15 => {
                    data = name(rng);
                    went = true;
                    OPT_EXPORT_NAME
                }
                16..=18 => [4, 11, 12, 0, 0xffff_ffff][rng.below(5) as usize],
                _ => rng.next_u64() as u32,
            };
            if rng.pct(5) {
                // Data the option does not expect.
                data.extend(rng.junk(1, 6));
            }
            option(&mut out, opt, &data);
            if rng.pct(3) {
                // A length the server must refuse without allocating it.
                let at = out.len() - data.len() - 4;
                let huge = (MAX_OPTION_LEN as u32 + 1).max(rng.next_u64() as u32);
                out[at..at + 4].copy_from_slice(&huge.to_be_bytes());
            }
            if went {
                break;
            }
        }
        if went {
            for _ in 0..rng.below(10) {
                request(rng, &mut out, true);
            }
            if rng.pct(30) {
                put_header(&mut out, 0, CMD_DISC, rng.next_u64(), 0, 0);
            }
        }
        if rng.pct(10) {
            mutate(rng, &mut out);
        }
        out
    }
}
