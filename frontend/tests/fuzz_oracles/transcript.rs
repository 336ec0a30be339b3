//! What the server sent during the handshake, checked against what the client sent.

use blockrep_frontend::proto::*;

use super::common::{be16, be32, be64, EXPORT, MAX_OPTION_LEN, OTHER_EXPORT, VOLUME_SIZE};

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

/// One option the client sent in full, and where it stands in the stream (1 = first).
struct Sent<'a> {
    opt: u32,
    data: &'a [u8],
    index: usize,
}

/// How the server answered one option: the final reply's type, and whether an
/// `NBD_INFO_EXPORT` came before it.
struct Answer {
    kind: u32,
    saw_export_info: bool,
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
    // Every complete, well-framed option, up to the end of what the server must answer.
    while let Some((opt, data)) = next_option(&mut c) {
        index += 1;
        stats.options += 1;
        if opt == OPT_EXPORT_NAME {
            // Either the export info and transmission, or a hang-up: both are legal.
            stats.transmission += 1;
            return;
        }
        let sent = Sent { opt, data, index };
        let answer = read_answer(&sent, &mut s, &ctx);
        check_answer(&sent, &answer, stats, &ctx);
        if opt == OPT_ABORT {
            assert_eq!(answer.kind, REP_ACK, "ABORT not acknowledged; {}", ctx());
            assert!(s.is_empty(), "server kept talking after ABORT; {}", ctx());
            stats.aborts += 1;
            return;
        }
        if opt == OPT_GO && answer.kind == REP_ACK {
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

/// Takes the next complete option off the client's stream: its number and data.
fn next_option<'a>(c: &mut &'a [u8]) -> Option<(u32, &'a [u8])> {
    if c.len() < 16 || be64(c) != IHAVEOPT {
        return None;
    }
    let opt = be32(&c[8..12]);
    let len = be32(&c[12..16]) as usize;
    if len > MAX_OPTION_LEN || c.len() - 16 < len {
        return None;
    }
    let data = &c[16..16 + len];
    *c = &c[16 + len..];
    Some((opt, data))
}

/// Reads the server's replies to one option off `s`, up to the final one (ACK or an error),
/// checking that each is well formed and of a type the option may get.
fn read_answer(sent: &Sent, s: &mut &[u8], ctx: &dyn Fn() -> String) -> Answer {
    let Sent { opt, index, .. } = *sent;
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
        *s = &s[20 + rlen..];
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
    Answer {
        kind,
        saw_export_info,
    }
}

/// Counts the answer and checks what it must be: ERR_UNSUP for an unknown option, and an
/// acknowledged INFO/GO names an export that exists and described it.
fn check_answer(
    sent: &Sent,
    answer: &Answer,
    stats: &mut HandshakeStats,
    ctx: &dyn Fn() -> String,
) {
    let (opt, kind) = (sent.opt, answer.kind);
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
            answer.saw_export_info,
            "INFO/GO acknowledged without NBD_INFO_EXPORT; {}",
            ctx()
        );
        let name = info_go_export(sent.data).unwrap_or_default();
        assert!(
            name.is_empty() || name == EXPORT || name == OTHER_EXPORT,
            "INFO/GO acknowledged for unknown export {name:?}; {}",
            ctx()
        );
    }
}
