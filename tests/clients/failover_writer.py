#!/usr/bin/env python3
"""A writer that follows the primary of an etcd-led volume, and its verifier.

write LOG URI [URI...]: writes 4 KiB blocks (each one's first 16 bytes, repeated, are its
sequence number and block index) round-robin over --blocks blocks, a FLUSH every
--flush-every writes, to whichever URI accepts a connection (tried in turn, as a client of
a volume whose non-leading nodes refuse NBD would). Every acknowledgement is logged with the
wall-clock time and the URI that gave it:
    C TIME URI           connected
    W SEQ BLOCK TIME URI a write acknowledged
    F SEQ TIME URI       a FLUSH acknowledged (covers the W lines since the last C)
    E SEQ TIME URI WHY   a request failed: reconnect
It runs until killed.

verify LOG URI: reads every block from URI and checks the FLUSH contract: each block holds
the last write to it that an acknowledged FLUSH covered, or a later write to it. Prints OK or
what is missing; exit code 0 only for OK.
"""

import argparse
import struct
import sys
import time

import nbd

BLOCK = 4096


def payload(seq, block):
    return struct.pack("<QQ", seq, block) * (BLOCK // 16)


def connect(uris):
    while True:
        for uri in uris:
            h = nbd.NBD()
            try:
                h.connect_uri(uri)
                return h, uri
            except nbd.Error:
                pass
        time.sleep(0.05)


def write(args):
    log = open(args.log, "a", buffering=1)
    h, uri = connect(args.uris)
    log.write(f"C {time.time():.6f} {uri}\n")
    seq = 0
    while True:
        seq += 1
        block = seq % args.blocks
        try:
            h.pwrite(payload(seq, block), block * BLOCK)
            log.write(f"W {seq} {block} {time.time():.6f} {uri}\n")
            if seq % args.flush_every == 0:
                h.flush()
                log.write(f"F {seq} {time.time():.6f} {uri}\n")
        except nbd.Error as e:
            log.write(f"E {seq} {time.time():.6f} {uri} {e}\n".replace("\n", " ") + "\n")
            # The handle's connection closes when it is dropped.
            del h
            h, uri = connect(args.uris)
            log.write(f"C {time.time():.6f} {uri}\n")


def verify(args):
    covered = {}  # block -> the highest seq an acknowledged FLUSH covered
    pending = {}
    for line in open(args.log):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "C" or parts[0] == "E":
            pending = {}
        elif parts[0] == "W":
            pending[int(parts[2])] = int(parts[1])
        elif parts[0] == "F":
            covered.update(pending)
            pending = {}
    h = nbd.NBD()
    h.connect_uri(args.uri)
    bad = []
    for block, seq in sorted(covered.items()):
        data = h.pread(BLOCK, block * BLOCK)
        got_seq, got_block = struct.unpack("<QQ", data[:16])
        if data != payload(got_seq, got_block) or got_block != block or got_seq < seq:
            bad.append(f"block {block}: holds seq {got_seq} (block {got_block}), needs >= {seq}")
    if bad:
        print(f"{len(bad)} of {len(covered)} flushed blocks lost: " + "; ".join(bad[:10]))
        sys.exit(1)
    print(f"OK: {len(covered)} flushed blocks")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("log")
    w.add_argument("uris", nargs="+")
    w.add_argument("--blocks", type=int, default=256)
    w.add_argument("--flush-every", type=int, default=4)
    v = sub.add_parser("verify")
    v.add_argument("log")
    v.add_argument("uri")
    args = p.parse_args()
    write(args) if args.cmd == "write" else verify(args)


if __name__ == "__main__":
    main()
