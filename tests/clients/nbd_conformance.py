#!/usr/bin/python3
"""NBD conformance checks for blockrep, driven through libnbd's Python binding.

Usage: /usr/bin/python3 nbd_conformance.py nbd://HOST:PORT/[EXPORT]

Run by tests/nbd_conformance.rs against a fresh `blockrep serve`. Each check is a named
function; the run prints one TAP line per check ("ok N - name" or "not ok N - name: why"),
the plan "1..N" and a summary, and exits 1 if any check failed. The checks write to the
export (its first 64 MiB), so point it at a scratch volume only.

Every check opens its own connections and uses its own region of the export, so a failure
in one cannot make another fail. libnbd refuses out-of-bounds, misaligned or unadvertised
requests on the client side ("strict mode"); the error checks switch that off so the
server itself is what answers.
"""
import errno
import os
import socket
import struct
import sys
import threading
import urllib.parse

import nbd

MIB = 1 << 20

# Wire constants (NBD protocol, doc/proto.md), used by the raw-socket handshake checks
# where libnbd would hide the bytes that are being checked.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_EXPORT_NAME = 1
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0
CMD_DISC = 2
TFLAG_HAS_FLAGS = 1 << 0
EXPORT_NAME_PADDING = 124

# One region per check that writes, so checks never see each other's data: the first
# 32 MiB for the max-payload write, then 2 MiB each.
REGION_MAX_PAYLOAD = 0
(REGION_TILING, REGION_BLOCK_STATUS, REGION_TRIM, REGION_PIPELINE, REGION_MULTI_CONN,
 REGION_MISALIGNED, REGION_SIMPLE, REGION_EXPORT_NAME, REGION_ERRORS, REGION_ZEROES,
 REGION_DF, REGION_DISCONNECT) = range(34 * MIB, 58 * MIB, 2 * MIB)
SMALLEST_EXPORT = 64 * MIB


class CheckFailed(Exception):
    """A check's expectation did not hold; the message says what was seen."""


def expect(cond, why):
    if not cond:
        raise CheckFailed(why)


def pattern(seed, length):
    """Bytes that differ per seed and per position, so misplaced data is caught."""
    block = bytes((seed * 31 + i * 7 + (i >> 8)) & 0xFF for i in range(4096))
    return (block * (length // len(block) + 1))[:length]


def errno_of(call, *args):
    """0 if `call(*args)` succeeds, else the errno libnbd reported (-1 if none)."""
    try:
        call(*args)
    except nbd.Error as e:
        return e.errnum if e.errnum is not None else -1
    return 0


def errno_name(code):
    return errno.errorcode.get(code, str(code)) if code > 0 else str(code)


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def expect_same(got, want, what):
    at = first_difference(got, want)
    expect(at is None, f"{what}: first difference at byte {at} (got {len(got)} bytes)")


class Target:
    """Where the server is, from the URI given on the command line, and the handles the
    running check opened (the runner closes them, whatever the check's outcome)."""

    def __init__(self, uri):
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme != "nbd" or not parsed.hostname:
            raise SystemExit(f"usage: nbd_conformance.py nbd://HOST:PORT/[EXPORT] (got {uri!r})")
        self.uri = uri
        self.host = parsed.hostname
        self.port = parsed.port or 10809
        self.export = parsed.path.lstrip("/")
        # What OPT_LIST must name and what the raw handshakes ask for.
        self.listed_name = self.export or "blockrep"
        self.opened = []

    def handle(self, structured=True, meta=True, strict=True, opt_mode=False, hflags=None,
               log=None):
        """A libnbd handle; connected unless `opt_mode` leaves it negotiating."""
        h = nbd.NBD()
        self.opened.append(h)
        if log is not None:
            h.set_debug_callback(lambda _ctx, msg: log.append(msg))
            h.set_debug(True)
        if hflags is not None:
            h.set_handshake_flags(hflags)
        h.set_request_structured_replies(structured)
        if structured and meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if not strict:
            h.set_strict_mode(0)
        h.set_opt_mode(opt_mode)
        h.connect_uri(self.uri)
        return h

    def close_all(self):
        """Ends every handle the check opened the way its state allows."""
        for h in self.opened:
            try:
                if h.aio_is_ready():
                    h.shutdown()
                elif h.aio_is_negotiating():
                    h.opt_abort()
            except nbd.Error:
                pass
        self.opened.clear()


def block_sizes(h):
    return tuple(h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                                nbd.SIZE_MAXIMUM))


def unit_of(h):
    """An alignment every request of the checks keeps: the advertised minimum, at least 4 KiB."""
    return max(h.get_block_size(nbd.SIZE_MINIMUM), 4096)


CHECKS = []


def check(fn):
    """Registers a check; its name is the function's name."""
    CHECKS.append(fn)
    return fn


# ------------------------------------------------------------------ handshake


@check
def handshake_fixed_newstyle_go_by_default(t):
    log = []
    h = t.handle(log=log)
    expect(h.get_protocol() == "newstyle-fixed",
           f"protocol {h.get_protocol()!r}, want 'newstyle-fixed'")
    states = " ".join(log)
    expect("NEWSTYLE.OPT_GO" in states, "libnbd did not take the NBD_OPT_GO path")
    expect("OPT_EXPORT_NAME" not in states, "libnbd fell back to NBD_OPT_EXPORT_NAME")
    expect(h.aio_is_ready(), f"not in transmission after GO: {h.connection_state()}")
    expect(h.get_structured_replies_negotiated(), "structured replies were not negotiated")
    expect(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
           "base:allocation was not negotiated")
    expect(h.get_size() >= SMALLEST_EXPORT,
           f"export is {h.get_size()} bytes, the checks need {SMALLEST_EXPORT}")
    expect(len(h.pread(4096, 0)) == 4096, "a 4 KiB read returned a short buffer")


@check
def opt_info_then_go_agree(t):
    h = t.handle(opt_mode=True)
    h.opt_info()
    expect(h.aio_is_negotiating(), f"NBD_OPT_INFO left negotiation: {h.connection_state()}")
    seen = info_snapshot(h)
    h.opt_go()
    expect(h.aio_is_ready(), f"NBD_OPT_GO did not enter transmission: {h.connection_state()}")
    after = info_snapshot(h)
    expect(seen == after, f"INFO said {seen}, GO said {after}")


def info_snapshot(h):
    flags = {name: getattr(h, name)() for name in (
        "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
        "can_df", "can_multi_conn", "can_cache")}
    return {"size": h.get_size(), "block_sizes": block_sizes(h), **flags}


@check
def opt_info_unknown_export_is_refused_and_session_continues(t):
    h = t.handle(opt_mode=True)
    h.set_export_name("no-such-export-here")
    code = errno_of(h.opt_info)
    expect(code != 0, "NBD_OPT_INFO for an unknown export succeeded")
    expect(h.aio_is_negotiating(),
           f"an option error ended the session: {h.connection_state()}")
    h.set_export_name(t.export)
    h.opt_go()
    expect(h.aio_is_ready(), "NBD_OPT_GO after the refused option did not work")


@check
def opt_list_names_the_export(t):
    h = t.handle(opt_mode=True)
    names = []
    h.opt_list(lambda name, _description: names.append(name) or 0)
    expect(t.listed_name in names, f"NBD_OPT_LIST named {names}, not {t.listed_name!r}")
    expect(h.aio_is_negotiating(), f"NBD_OPT_LIST left negotiation: {h.connection_state()}")


@check
def opt_list_meta_context_offers_base_allocation(t):
    h = t.handle(opt_mode=True)
    contexts = []
    h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
    expect(nbd.CONTEXT_BASE_ALLOCATION in contexts,
           f"NBD_OPT_LIST_META_CONTEXT listed {contexts}")


@check
def opt_abort_closes_cleanly(t):
    h = t.handle(opt_mode=True)
    h.opt_abort()
    expect(h.aio_is_closed(), f"after NBD_OPT_ABORT the handle is {h.connection_state()}")


@check
def export_name_path_with_zero_padding_libnbd(t):
    """Plain newstyle (no FIXED_NEWSTYLE, no NO_ZEROES): libnbd can only send
    NBD_OPT_EXPORT_NAME and must then read the size, flags and 124 zero bytes; a wrong
    padding length would misframe the first reply below."""
    log = []
    h = t.handle(structured=False, hflags=0, log=log)
    states = " ".join(log)
    expect("OPT_EXPORT_NAME" in states, "libnbd did not take the NBD_OPT_EXPORT_NAME path")
    expect(h.get_protocol() == "newstyle", f"protocol {h.get_protocol()!r}, want 'newstyle'")
    expect(not h.get_structured_replies_negotiated(), "structured replies were negotiated")
    data = pattern(7, 64 * 1024)
    h.pwrite(data, REGION_EXPORT_NAME)
    expect_same(h.pread(len(data), REGION_EXPORT_NAME), data, "read after EXPORT_NAME")


def raw_export_name(t, client_flags):
    """Runs the greeting and NBD_OPT_EXPORT_NAME by hand. Returns (server handshake flags,
    size, transmission flags, the bytes between the flags and the first reply, and whether
    a READ right after them got a well-framed simple reply)."""
    with socket.create_connection((t.host, t.port), timeout=10) as s:
        magic, opt_magic, hflags = struct.unpack(">QQH", recv_exact(s, 18))
        expect(magic == NBDMAGIC and opt_magic == IHAVEOPT,
               f"greeting magics {magic:#x} {opt_magic:#x}")
        name = t.listed_name.encode()
        s.sendall(struct.pack(">I", client_flags))
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
        size, tflags = struct.unpack(">QH", recv_exact(s, 10))
        padding_len = 0 if client_flags & FLAG_NO_ZEROES else EXPORT_NAME_PADDING
        padding = recv_exact(s, padding_len)
        cookie = 0x5EED
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, cookie, 0, 512))
        reply_magic, error, got_cookie = struct.unpack(">IIQ", recv_exact(s, 16))
        framed = reply_magic == SIMPLE_REPLY_MAGIC and error == 0 and got_cookie == cookie
        if framed:
            recv_exact(s, 512)
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, cookie + 1, 0, 0))
        return hflags, size, tflags, padding, framed


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        got = s.recv(n - len(out))
        expect(got, f"server closed the connection after {len(out)} of {n} bytes")
        out += got
    return bytes(out)


@check
def export_name_sends_124_zero_bytes_without_no_zeroes(t):
    hflags, size, tflags, padding, framed = raw_export_name(t, FLAG_FIXED_NEWSTYLE)
    expect(hflags & FLAG_FIXED_NEWSTYLE, f"greeting flags {hflags:#x} lack FIXED_NEWSTYLE")
    expect(hflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) == 0,
           f"greeting flags {hflags:#x} set bits the protocol does not define")
    expect(size >= SMALLEST_EXPORT, f"EXPORT_NAME reported size {size}")
    expect(tflags & TFLAG_HAS_FLAGS, f"transmission flags {tflags:#x} lack HAS_FLAGS")
    expect(padding == bytes(EXPORT_NAME_PADDING),
           f"the 124 padding bytes are not all zero: {padding.hex()}")
    expect(framed, "the first reply after the padding is misframed (padding longer than 124?)")


@check
def export_name_sends_no_padding_with_no_zeroes(t):
    hflags, _size, _tflags, padding, framed = raw_export_name(
        t, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
    expect(hflags & FLAG_NO_ZEROES, f"greeting flags {hflags:#x} do not offer NO_ZEROES")
    expect(padding == b"", "padding read although NO_ZEROES was negotiated")
    expect(framed, "with NO_ZEROES the first reply is misframed (server sent padding?)")


# ------------------------------------------------------------------ flags, sizes


@check
def block_sizes_advertised_and_consistent(t):
    h = t.handle()
    minimum, preferred, maximum = block_sizes(h)
    size = h.get_size()
    print(f"# block sizes: minimum {minimum}, preferred {preferred}, maximum {maximum}")
    expect(minimum > 0, "no NBD_INFO_BLOCK_SIZE was sent (minimum is 0)")
    expect(is_power_of_two(minimum) and minimum <= 65536,
           f"minimum {minimum} is not a power of two up to 64 KiB")
    expect(is_power_of_two(preferred) and preferred >= max(minimum, 512),
           f"preferred {preferred} is not a power of two >= max(minimum, 512)")
    expect(maximum >= preferred, f"maximum {maximum} < preferred {preferred}")
    expect(maximum >= MIB, f"maximum {maximum} is under 1 MiB (the spec says SHOULD)")
    expect(size % minimum == 0, f"export size {size} is not a multiple of {minimum}")


def is_power_of_two(x):
    return x > 0 and x & (x - 1) == 0


@check
def transmission_flags_advertised(t):
    h = t.handle()
    want = {"can_flush": True, "can_fua": True, "can_trim": True, "can_zero": True,
            "can_multi_conn": True, "is_read_only": False, "can_df": True,
            "can_cache": True}
    got = {name: bool(getattr(h, name)()) for name in want}
    print(f"# flags: {got}, can_fast_zero {h.can_fast_zero()}")
    wrong = {k: v for k, v in got.items() if v != want[k]}
    expect(not wrong, f"flags differ from what blockrep must advertise: {wrong}")
    expect(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
           "meta context base:allocation not negotiated")
    if h.can_fast_zero():
        expect(h.can_zero(), "SEND_FAST_ZERO without SEND_WRITE_ZEROES")
    if h.can_fua():
        expect(h.can_flush(), "SEND_FUA without SEND_FLUSH")


@check
def simple_replies_when_structured_declined(t):
    h = t.handle(structured=False)
    expect(not h.get_structured_replies_negotiated(), "structured replies were negotiated")
    expect(not h.can_df(), "SEND_DF advertised without structured replies")
    expect(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
           "a meta context is active without structured replies")
    data = pattern(11, 128 * 1024)
    h.pwrite(data, REGION_SIMPLE)
    expect_same(h.pread(len(data), REGION_SIMPLE), data, "simple-reply read back")


# ------------------------------------------------------------------ data path


@check
def max_payload_write_reads_back(t):
    h = t.handle()
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
    expect(0 < maximum <= 32 * MIB,
           f"maximum payload {maximum} is outside what this check can use")
    data = pattern(3, maximum)
    h.pwrite(data, REGION_MAX_PAYLOAD)
    expect_same(h.pread(maximum, REGION_MAX_PAYLOAD), data,
                f"{maximum}-byte write read back")


@check
def structured_read_chunks_tile_data_and_holes(t):
    h = t.handle()
    u = unit_of(h)
    span = 64 * u
    base = REGION_TILING
    # Zeroes everywhere, then data islands: the read mixes data and zero runs.
    h.zero(span, base)
    want = bytearray(span)
    for k, (at, n) in enumerate([(0, 3 * u), (10 * u, u), (40 * u, 5 * u), (63 * u, u)]):
        data = pattern(20 + k, n)
        h.pwrite(data, base + at)
        want[at:at + n] = data
    chunks = []

    def on_chunk(buf, offset, status, _err):
        chunks.append((offset, bytes(buf), status))
        return 0

    buf = h.pread_structured(span, base, on_chunk)
    expect_same(bytes(buf), bytes(want), "structured read")
    expect(all(s in (nbd.READ_DATA, nbd.READ_HOLE) for _o, _b, s in chunks),
           f"chunk statuses {sorted({s for _o, _b, s in chunks})}")
    covered = sorted((o, o + len(b)) for o, b, _s in chunks)
    expect(covered and covered[0][0] == base and covered[-1][1] == base + span,
           f"chunks span {covered[:1]}..{covered[-1:]}, want [{base}, {base + span})")
    gaps = [(a, b) for a, b in zip(covered, covered[1:]) if a[1] != b[0]]
    expect(not gaps, f"chunks overlap or leave gaps at {gaps[:3]}")
    for o, b, s in chunks:
        if s == nbd.READ_HOLE:
            expect(b == bytes(len(b)), f"hole chunk at {o} does not read as zeroes")
        expect_same(b, bytes(want[o - base:o - base + len(b)]), f"chunk at {o}")
    holes = sum(1 for c in chunks if c[2] == nbd.READ_HOLE)
    print(f"# {len(chunks)} chunks, {holes} of them holes")


@check
def block_status_one_chunk_per_context_from_offset(t):
    h = t.handle()
    u = unit_of(h)
    base, span = REGION_BLOCK_STATUS, 256 * u
    h.zero(span, base)
    h.pwrite(pattern(5, 16 * u), base + 32 * u)
    replies = block_status(h, span, base)
    expect(len(replies) == 1, f"{len(replies)} BLOCK_STATUS chunks for one context")
    context, offset, extents = replies[0]
    expect(context == nbd.CONTEXT_BASE_ALLOCATION, f"chunk for context {context!r}")
    expect(offset == base, f"extents start at {offset}, want {base}")
    lengths = [n for n, _f in extents]
    expect(extents and all(n > 0 for n in lengths), f"empty or zero-length extents {extents}")
    expect(sum(lengths[:-1]) < span, "an extent before the last one ends past the request")
    expect(all(f & ~(nbd.STATE_HOLE | nbd.STATE_ZERO) == 0 for _n, f in extents),
           f"base:allocation flags outside HOLE|ZERO: {extents}")
    data = h.pread(min(sum(lengths), span), base)
    at = 0
    for n, f in extents:
        piece = data[at:at + n]
        if f & nbd.STATE_ZERO:
            expect(piece == bytes(len(piece)), f"extent at +{at} says ZERO but has data")
        at += n


def block_status(h, length, offset, flags=0):
    """[(context, offset, [(length, flags), ...])], one entry per chunk received."""
    replies = []

    def on_extents(context, at, entries, _err):
        pairs = list(zip(entries[0::2], entries[1::2]))
        replies.append((context, at, pairs))
        return 0

    h.block_status(length, offset, on_extents, flags)
    return replies


@check
def block_status_req_one_returns_one_extent(t):
    h = t.handle()
    u = unit_of(h)
    base = REGION_BLOCK_STATUS
    for length in (u, 64 * u):
        replies = block_status(h, length, base, nbd.CMD_FLAG_REQ_ONE)
        expect(len(replies) == 1, f"{len(replies)} chunks with REQ_ONE")
        extents = replies[0][2]
        expect(len(extents) == 1, f"REQ_ONE over {length} bytes gave {len(extents)} extents")
        expect(0 < extents[0][0] <= length,
               f"REQ_ONE extent of {extents[0][0]} bytes for a {length}-byte request")


@check
def trimmed_range_reports_hole_or_zero(t):
    h = t.handle()
    u = unit_of(h)
    base = REGION_TRIM
    h.pwrite(pattern(9, 64 * u), base)
    h.trim(16 * u, base + 16 * u)
    replies = block_status(h, 16 * u, base + 16 * u)
    expect(len(replies) == 1, f"{len(replies)} BLOCK_STATUS chunks")
    n, flags = replies[0][2][0]
    expect(flags & (nbd.STATE_HOLE | nbd.STATE_ZERO),
           f"trimmed range starts with an extent of {n} bytes, flags {flags} (no HOLE/ZERO)")
    if flags & nbd.STATE_ZERO:
        got = h.pread(min(n, 16 * u), base + 16 * u)
        expect(got == bytes(len(got)), "trimmed range reported ZERO but reads data")
    kept = h.pread(16 * u, base)
    expect_same(kept, pattern(9, 64 * u)[:16 * u], "data before the trimmed range")


@check
def sixty_four_pipelined_writes(t):
    h = t.handle()
    u = unit_of(h)
    base = REGION_PIPELINE
    buffers = [pattern(100 + i, u) for i in range(64)]
    cookies = [h.aio_pwrite(b, base + i * u) for i, b in enumerate(buffers)]
    in_flight = h.aio_in_flight()
    expect(in_flight == 64, f"only {in_flight} of 64 writes were in flight at once")
    while h.aio_in_flight() > 0:
        h.poll(-1)
    done = [h.aio_command_completed(c) for c in cookies]
    expect(all(done), f"{done.count(False)} writes never completed")
    expect_same(h.pread(64 * u, base), b"".join(buffers), "pipelined writes read back")


@check
def df_read_is_one_data_chunk(t):
    """With DF the reply may not be split, so a range of data and zeroes comes back as one
    data chunk (holes are not allowed either)."""
    h = t.handle()
    expect(h.can_df(), "SEND_DF not advertised")
    u = unit_of(h)
    base, span = REGION_DF, 16 * u
    h.zero(span, base)
    data = pattern(31, 2 * u)
    h.pwrite(data, base + 4 * u)
    chunks = []

    def on_chunk(buf, offset, status, _err):
        chunks.append((offset, len(buf), status))
        return 0

    buf = h.pread_structured(span, base, on_chunk, nbd.CMD_FLAG_DF)
    expect(chunks == [(base, span, nbd.READ_DATA)],
           f"DF read of {span} bytes at {base} came as {chunks}")
    want = bytes(4 * u) + data + bytes(span - 6 * u)
    expect_same(bytes(buf), want, "DF read")


@check
def write_zeroes_read_back_as_zeroes(t):
    h = t.handle()
    u = unit_of(h)
    base, span = REGION_ZEROES, 16 * u
    for flags in (0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA):
        h.pwrite(pattern(flags + 1, span), base)
        h.zero(span - 2 * u, base + u, flags)
        want = pattern(flags + 1, span)[:u] + bytes(span - 2 * u) + pattern(flags + 1, span)[-u:]
        expect_same(h.pread(span, base), want, f"after WRITE_ZEROES with flags {flags:#x}")
    if h.can_fast_zero():
        before = pattern(9, span)
        h.pwrite(before, base)
        code = errno_of(h.zero, span, base, nbd.CMD_FLAG_FAST_ZERO)
        expect(code in (0, errno.ENOTSUP), f"FAST_ZERO got {errno_name(code)}")
        after = h.pread(span, base)
        if code == 0:
            expect(after == bytes(span), "FAST_ZERO succeeded but the range is not zero")
        else:
            expect_same(after, before, "a refused FAST_ZERO changed the data")


@check
def writes_before_disconnect_survive_without_flush(t):
    """Clients such as nbdcopy write, then disconnect without FLUSH: a new connection must
    read what they wrote."""
    a = t.handle()
    data = pattern(51, 128 * 1024)
    a.pwrite(data, REGION_DISCONNECT)
    a.shutdown()
    b = t.handle()
    expect_same(b.pread(len(data), REGION_DISCONNECT), data, "read after the writer's DISC")


@check
def server_survives_a_client_vanishing_with_requests_in_flight(t):
    a = t.handle()
    u = unit_of(a)
    for i in range(16):
        a.aio_pread(nbd.Buffer(4 * u), i * 4 * u)
        a.aio_pwrite(pattern(60 + i, u), REGION_DISCONNECT + MIB + i * u)
    a.shutdown(nbd.SHUTDOWN_ABANDON_PENDING)
    b = t.handle()
    expect(len(b.pread(u, 0)) == u, "a new connection cannot read after the abandoned one")


# ------------------------------------------------------------------ errors


@check
def write_past_end_is_enospc(t):
    """The spec lets a server answer EINVAL, but says it SHOULD send ENOSPC for writes
    past the end, and blockrep does; both a straddling and a wholly-outside write."""
    h = t.handle(strict=False)
    size, u = h.get_size(), unit_of(h)
    for offset in (size - u, size, size + 16 * u):
        code = errno_of(h.pwrite, bytes(2 * u), offset)
        expect(code == errno.ENOSPC,
               f"write of {2 * u} bytes at {offset} (size {size}) got {errno_name(code)}")
    expect(errno_of(h.pread, u, 0) == 0, "connection unusable after the refused writes")


@check
def read_trim_zero_past_end_are_refused(t):
    h = t.handle(strict=False)
    size, u = h.get_size(), unit_of(h)
    cases = [("read", h.pread, (2 * u, size - u), errno.EINVAL),
             ("trim", h.trim, (2 * u, size - u), errno.EINVAL),
             ("write-zeroes", h.zero, (2 * u, size - u), errno.ENOSPC)]
    for what, call, args, want in cases:
        code = errno_of(call, *args)
        expect(code == want, f"{what} past the end got {errno_name(code)}, "
                             f"want {errno_name(want)}")
    expect(errno_of(h.pread, u, 0) == 0, "connection unusable after the refused requests")


@check
def unknown_command_flags_are_einval(t):
    h = t.handle(strict=False)
    u = unit_of(h)
    data = pattern(13, u)
    h.pwrite(data, REGION_ERRORS)
    for what, call, args in [
            ("write", h.pwrite, (bytes(u), REGION_ERRORS, 1 << 9)),
            ("read", h.pread, (u, REGION_ERRORS, 1 << 9)),
            ("flush", h.flush, (1 << 12,))]:
        code = errno_of(call, *args)
        expect(code == errno.EINVAL,
               f"{what} with unknown flag got {errno_name(code)}, want EINVAL")
    expect_same(h.pread(u, REGION_ERRORS), data, "data after the refused flagged write")


@check
def misaligned_reads_match_advertised_minimum(t):
    h = t.handle(strict=False)
    minimum = h.get_block_size(nbd.SIZE_MINIMUM)
    base = REGION_MISALIGNED
    data = pattern(17, 8192)
    h.pwrite(data, base)
    code = errno_of(h.pread, 3, base + 1)
    if minimum > 1:
        expect(code == errno.EINVAL,
               f"a 3-byte read at +1 with minimum {minimum} got {errno_name(code)}")
        return
    expect(code == 0, f"minimum 1 advertised, but a 3-byte read at +1 got "
                      f"{errno_name(code)}")
    for offset, length in ((1, 3), (511, 2), (4095, 4097)):
        expect_same(h.pread(length, base + offset), data[offset:offset + length],
                    f"read of {length} bytes at +{offset}")
    h.pwrite(b"xyz", base + 4097)
    want = data[:4097] + b"xyz" + data[4100:]
    expect_same(h.pread(8192, base), want, "after a 3-byte write at +4097")


# ------------------------------------------------------------------ multi-conn


@check
def multi_conn_write_flush_then_read_elsewhere(t):
    a, b = t.handle(), t.handle()
    expect(a.can_multi_conn(), "CAN_MULTI_CONN not advertised")
    data = pattern(42, 64 * 1024)
    a.pwrite(data, REGION_MULTI_CONN)
    a.flush()
    expect_same(b.pread(len(data), REGION_MULTI_CONN), data, "read on the second connection")


@check
def multi_conn_flush_on_another_connection_covers_the_write(t):
    a, b, c = t.handle(), t.handle(), t.handle()
    data = pattern(43, 64 * 1024)
    at = REGION_MULTI_CONN + MIB
    a.pwrite(data, at)
    b.flush()
    expect_same(c.pread(len(data), at), data, "read on a third connection")
    fua = pattern(44, 4096)
    a.pwrite(fua, at, nbd.CMD_FLAG_FUA)
    expect_same(b.pread(len(fua), at), fua, "FUA write read on another connection")


# A check that has not finished after this long has hung (libnbd waits forever for bytes
# a broken server never sends, and signals do not interrupt its waits).
CHECK_SECONDS = 60


def run_check(fn, target):
    """Runs one check on a worker thread. Returns None if it passed, else why it failed,
    and whether it hung (its handles are then abandoned, not closed: closing would wait on
    the hung call)."""
    outcome = []

    def body():
        try:
            fn(target)
            outcome.append(None)
        except CheckFailed as e:
            outcome.append(str(e))
        except nbd.Error as e:
            outcome.append(f"libnbd error: {e}")
        except Exception as e:  # noqa: BLE001 - any crash of a check is that check failing
            outcome.append(f"{type(e).__name__}: {e}")

    worker = threading.Thread(target=body, name=fn.__name__, daemon=True)
    worker.start()
    worker.join(CHECK_SECONDS)
    if worker.is_alive():
        target.opened = []
        return f"no answer within {CHECK_SECONDS} s (hung)", True
    target.close_all()
    return outcome[0], False


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    target = Target(sys.argv[1])
    failed = 0
    hung = False
    for n, fn in enumerate(CHECKS, 1):
        why, stuck = run_check(fn, target)
        hung = hung or stuck
        if why is None:
            print(f"ok {n} - {fn.__name__}")
        else:
            failed += 1
            print(f"not ok {n} - {fn.__name__}: {why}")
        sys.stdout.flush()
    print(f"1..{len(CHECKS)}")
    print(f"# {len(CHECKS) - failed} passed, {failed} failed, {len(CHECKS)} checks")
    sys.stdout.flush()
    if hung:
        # A hung worker thread would keep the interpreter from exiting.
        os._exit(1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
