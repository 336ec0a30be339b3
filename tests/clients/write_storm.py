#!/usr/bin/python3
"""A write storm over NBD (libnbd), and the verifier that checks an image against its logs.

Run with /usr/bin/python3 (the interpreter that has the libnbd binding `nbd`).

  storm URI LOG --blocks N --seq-base B [--seed S] [--depth 32] [--flush-every 64]
                [--duration SECS] [--large-every L --large-blocks K]
      Pipelined async 4 KiB writes to random blocks of [0, N). Never two writes to the same
      block in flight at once, so a block's writes complete in issue (= seq) order. With
      --large-every, every L-th write is one request over K contiguous blocks instead (each
      block carrying its own payload and seq, logged as K writes). Appends to LOG (line
      buffered, flushed after every batch of completions):
        I block seq   a write was issued (it may or may not have reached the server)
        W block seq   that write was acknowledged
        F k           a FLUSH was acknowledged; it was sent when the log held k W-lines,
                      so the first k W-lines of this log are durable
      Runs until --duration elapses (then disconnects) or the server disappears (then exits
      quietly, status 0). seq is --seq-base plus a counter, so a later run with a larger
      base keeps every block's seq increasing across runs.

  verify IMAGE LOG [LOG...] --blocks N [--all-acked]
      IMAGE is `blockrep export` output; LOGs are the storm logs of every run on this store,
      oldest first. For every block of the region, the image must hold either zeroes (only
      if no write to the block is covered by an acknowledged FLUSH) or an intact payload
      (checksum ok: not torn) of a write issued to that very block, whose seq is at least
      the highest seq of that block's covered writes. Everything past the region is zero.
      --all-acked treats every acknowledged write as covered (the SIGTERM contract).
      Prints a JSON summary on success; exits 1 listing the violations otherwise.

  tamper IMAGE OUT MODE LOG [LOG...] --blocks N
      Writes a copy of IMAGE with one deliberate defect, for testing the verifier.
      MODE: zero-covered | torn | swap | rollback | unissued | outside.

  compare URI IMAGE
      Reads the whole device over NBD and compares it with IMAGE; exit 1 on a difference.
"""

import argparse
import hashlib
import json
import os
import random
import struct
import sys
import time

BLOCK = 4096
MAGIC = b"STRM"
HEAD = struct.Struct("<4sQQ")  # magic, block, seq
SUM_LEN = 32


def payload(block, seq):
    """The 4 KiB a write of `seq` to `block` carries: header, filler derived from both, and
    a SHA-256 of everything before it (a torn mix of two writes fails the checksum)."""
    head = HEAD.pack(MAGIC, block, seq)
    seed = hashlib.sha256(head).digest()
    n = BLOCK - HEAD.size - SUM_LEN
    filler = (seed * (n // len(seed) + 1))[:n]
    body = head + filler
    return body + hashlib.sha256(body).digest()


def decode(data):
    """(block, seq) of an intact payload, or an error string."""
    magic, block, seq = HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        return None, "no write payload here (bad magic %r)" % magic
    body = data[: BLOCK - SUM_LEN]
    if hashlib.sha256(body).digest() != data[BLOCK - SUM_LEN:]:
        return None, "torn or corrupt payload (checksum mismatch; header says block %d seq %d)" % (
            block,
            seq,
        )
    if payload(block, seq) != data:
        return None, "payload of block %d seq %d has the wrong filler" % (block, seq)
    return (block, seq), None


# ----------------------------------------------------------------------------------- storm


def storm(args):
    import nbd

    log = open(args.log, "a", buffering=1)
    rng = random.Random(args.seed)
    h = nbd.NBD()
    h.connect_uri(args.uri)
    size = h.get_size()
    if args.blocks * BLOCK > size:
        sys.exit("storm: region of %d blocks exceeds the %d-byte device" % (args.blocks, size))
    hot = max(1, min(64, args.blocks // 8))
    inflight = {}  # cookie -> ("W", block, seq, buf) | ("F", k)
    busy = set()
    flush_inflight = False
    acked = 0
    flushes = 0
    issued = 0
    since_flush = 0
    counter = 0
    deadline = time.monotonic() + args.duration if args.duration else None
    reason = "duration elapsed"
    lines = []  # W and F lines not yet written to the log

    def pick_run(k):
        """The first of k contiguous blocks none of which is in flight."""
        while True:
            b = rng.randrange(args.blocks - k + 1)
            if not any(x in busy for x in range(b, b + k)):
                return b

    def pick():
        while True:
            if rng.random() < 0.5:
                b = rng.randrange(hot)  # a hot set, so blocks get overwritten often
            else:
                b = rng.randrange(args.blocks)
            if b not in busy:
                return b

    def retire():
        """Logs every completed command; returns the error of a failed one, if any."""
        nonlocal acked, flushes, flush_inflight
        failure = None
        while inflight:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                break
            what = inflight.pop(cookie)
            try:
                h.aio_command_completed(cookie)  # raises if the command failed
            except nbd.Error as e:
                failure = failure or e  # not acknowledged: not logged
                if what[0] == "W":
                    busy.discard(what[1])
                elif what[0] == "L":
                    for b, _ in what[1]:
                        busy.discard(b)
                else:
                    flush_inflight = False
                continue
            if what[0] == "W":
                _, b, seq, _ = what
                busy.discard(b)
                acked += 1
                lines.append("W %d %d\n" % (b, seq))
            elif what[0] == "L":
                for b, seq in what[1]:
                    busy.discard(b)
                    acked += 1
                    lines.append("W %d %d\n" % (b, seq))
            else:
                flush_inflight = False
                flushes += 1
                lines.append("F %d\n" % what[1])
        if lines:
            log.write("".join(lines))
            log.flush()
            lines.clear()
        return failure

    try:
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                break
            while len(inflight) < args.depth:
                if args.large_every and (issued + 1) % args.large_every == 0:
                    first = pick_run(args.large_blocks)
                    run = []
                    for b in range(first, first + args.large_blocks):
                        counter += 1
                        run.append((b, args.seq_base + counter))
                    log.write("".join("I %d %d\n" % w for w in run))
                    log.flush()
                    cookie = h.aio_pwrite(b"".join(payload(b, q) for b, q in run), first * BLOCK)
                    inflight[cookie] = ("L", run)
                    busy.update(b for b, _ in run)
                    issued += 1
                    since_flush += 1
                    continue
                b = pick()
                counter += 1
                seq = args.seq_base + counter
                buf = payload(b, seq)
                # Log the issue before the request can reach the server.
                log.write("I %d %d\n" % (b, seq))
                log.flush()
                cookie = h.aio_pwrite(buf, b * BLOCK)
                inflight[cookie] = ("W", b, seq, buf)
                busy.add(b)
                issued += 1
                since_flush += 1
            if args.flush_every and since_flush >= args.flush_every and not flush_inflight:
                cookie = h.aio_flush()
                inflight[cookie] = ("F", acked)
                flush_inflight = True
                since_flush = 0
            try:
                h.poll(-1)
            finally:
                # Replies that arrived before a failure are acknowledgements all the same.
                failure = retire()
            if failure is not None:
                raise failure
        # --duration elapsed: let what is in flight finish (and be logged), then leave.
        while inflight:
            try:
                h.poll(-1)
            finally:
                failure = retire()
            if failure is not None:
                raise failure
        h.shutdown()
    except nbd.Error as e:
        reason = "server gone: %s" % e
    finally:
        if lines:
            log.write("".join(lines))
        log.close()
    print(
        "storm: issued %d, acknowledged %d, flushes %d; stopped: %s"
        % (issued, acked, flushes, reason),
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------- logs


class Logs:
    """What the storm logs of all runs on one store say."""

    def __init__(self, paths, all_acked=False):
        self.issued = set()  # (block, seq)
        self.covered = {}  # block -> highest covered seq
        self.acked = 0
        self.covered_writes = 0
        self.flushes = 0
        self.issued_by_block = {}
        for path in paths:
            w_lines = []
            cover = 0
            with open(path) as f:
                for line in f:
                    if not line.endswith("\n"):
                        continue  # a line cut short: ignore it
                    parts = line.split()
                    if parts[0] == "I":
                        b, s = int(parts[1]), int(parts[2])
                        self.issued.add((b, s))
                        self.issued_by_block.setdefault(b, []).append(s)
                    elif parts[0] == "W":
                        w_lines.append((int(parts[1]), int(parts[2])))
                    elif parts[0] == "F":
                        self.flushes += 1
                        cover = max(cover, int(parts[1]))
                    else:
                        raise SystemExit("%s: unknown log line %r" % (path, line))
            if all_acked:
                cover = len(w_lines)
            if cover > len(w_lines):
                raise SystemExit("%s: F %d but only %d W lines" % (path, cover, len(w_lines)))
            self.acked += len(w_lines)
            self.covered_writes += cover
            for b, s in w_lines:
                if (b, s) not in self.issued:
                    raise SystemExit("%s: W %d %d was never issued" % (path, b, s))
            for b, s in w_lines[:cover]:
                if s > self.covered.get(b, -1):
                    self.covered[b] = s


def read_image(path, blocks):
    with open(path, "rb") as f:
        img = f.read()
    if len(img) < blocks * BLOCK:
        raise SystemExit("%s: %d bytes, smaller than the %d-block region" % (path, len(img), blocks))
    return img


def verify(args):
    logs = Logs(args.logs, args.all_acked)
    img = read_image(args.image, args.blocks)
    zero = bytes(BLOCK)
    errors = []
    nonzero = at_covered = newer = 0
    for b in range(args.blocks):
        data = img[b * BLOCK : (b + 1) * BLOCK]
        hc = logs.covered.get(b)
        if data == zero:
            if hc is not None:
                errors.append("block %d: zeroes, but write seq %d to it was flushed" % (b, hc))
            continue
        nonzero += 1
        found, err = decode(data)
        if err:
            errors.append("block %d: %s" % (b, err))
            continue
        fb, seq = found
        if fb != b:
            errors.append("block %d: holds the write of seq %d meant for block %d" % (b, seq, fb))
            continue
        if (b, seq) not in logs.issued:
            errors.append("block %d: holds seq %d, which was never issued to it" % (b, seq))
            continue
        if hc is not None and seq < hc:
            errors.append(
                "block %d: holds seq %d, older than the flushed write seq %d (lost write)"
                % (b, seq, hc)
            )
            continue
        if hc is not None and seq == hc:
            at_covered += 1
        elif hc is not None:
            newer += 1
    tail = img[args.blocks * BLOCK :]
    if tail.strip(b"\0"):
        first = next(i for i, c in enumerate(tail) if c)
        errors.append(
            "byte %d past the region is not zero (nothing writes there)"
            % (args.blocks * BLOCK + first)
        )
    if errors:
        print("verify: %d violation(s) in %s:" % (len(errors), args.image), file=sys.stderr)
        for e in errors[:30]:
            print("  " + e, file=sys.stderr)
        sys.exit(1)
    print(
        json.dumps(
            {
                "issued": len(logs.issued),
                "acked": logs.acked,
                "flushes": logs.flushes,
                "covered_writes": logs.covered_writes,
                "covered_blocks": len(logs.covered),
                "nonzero_blocks": nonzero,
                "blocks_at_covered_seq": at_covered,
                "blocks_newer_than_covered": newer,
            }
        )
    )


def tamper(args):
    logs = Logs(args.logs)
    img = bytearray(read_image(args.image, args.blocks))
    covered = sorted(logs.covered)
    if not covered:
        raise SystemExit("tamper: no covered block to tamper with")
    rng = random.Random(7)

    def put(b, data):
        img[b * BLOCK : (b + 1) * BLOCK] = data

    mode = args.mode
    if mode == "zero-covered":
        b = rng.choice(covered)
        put(b, bytes(BLOCK))
    elif mode == "torn":
        # Second half of a covered block replaced by the same half of another write to it
        # (what a torn 4 KiB write would leave).
        b = rng.choice(covered)
        other = payload(b, logs.covered[b] + 10**6)
        img[b * BLOCK + 2048 : (b + 1) * BLOCK] = other[2048:]
    elif mode == "swap":
        a, b = covered[0], covered[-1]
        da = bytes(img[a * BLOCK : (a + 1) * BLOCK])
        put(a, img[b * BLOCK : (b + 1) * BLOCK])
        put(b, da)
    elif mode == "rollback":
        # An older write to a block that has a newer covered one.
        cands = [
            (b, s)
            for b in covered
            for s in logs.issued_by_block.get(b, [])
            if s < logs.covered[b]
        ]
        if not cands:
            raise SystemExit("tamper: no block has an older write to roll back to")
        b, s = rng.choice(cands)
        put(b, payload(b, s))
    elif mode == "unissued":
        b = rng.choice(covered)
        put(b, payload(b, logs.covered[b] + 12345))
    elif mode == "outside":
        if len(img) <= args.blocks * BLOCK:
            raise SystemExit("tamper: the image has nothing past the region")
        img[args.blocks * BLOCK + 5] = 1
    else:
        raise SystemExit("tamper: unknown mode %r" % mode)
    with open(args.out, "wb") as f:
        f.write(img)


def compare(args):
    import nbd

    h = nbd.NBD()
    h.connect_uri(args.uri)
    size = h.get_size()
    with open(args.image, "rb") as f:
        img = f.read()
    if size != len(img):
        sys.exit("compare: device is %d bytes, image %d" % (size, len(img)))
    chunk = 4 << 20
    for at in range(0, size, chunk):
        got = h.pread(min(chunk, size - at), at)
        want = img[at : at + len(got)]
        if got != want:
            first = next(i for i in range(len(got)) if got[i] != want[i])
            sys.exit(
                "compare: the device differs from %s at byte %d (block %d)"
                % (args.image, at + first, (at + first) // BLOCK)
            )
    h.shutdown()
    print("compare: %d bytes identical" % size)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("storm")
    s.add_argument("uri")
    s.add_argument("log")
    s.add_argument("--blocks", type=int, required=True)
    s.add_argument("--seq-base", type=int, required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--depth", type=int, default=32)
    s.add_argument("--flush-every", type=int, default=64)
    s.add_argument("--duration", type=float, default=0)
    s.add_argument("--large-every", type=int, default=0)
    s.add_argument("--large-blocks", type=int, default=80)
    v = sub.add_parser("verify")
    v.add_argument("image")
    v.add_argument("logs", nargs="+")
    v.add_argument("--blocks", type=int, required=True)
    v.add_argument("--all-acked", action="store_true")
    t = sub.add_parser("tamper")
    t.add_argument("image")
    t.add_argument("out")
    t.add_argument("mode")
    t.add_argument("logs", nargs="+")
    t.add_argument("--blocks", type=int, required=True)
    c = sub.add_parser("compare")
    c.add_argument("uri")
    c.add_argument("image")
    args = p.parse_args()
    {"storm": storm, "verify": verify, "tamper": tamper, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    main()
