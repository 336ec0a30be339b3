#!/usr/bin/python3
"""Checks that every FLUSH-covered write of a storm is on enough copies of the volume.

  majority.py IMAGE [IMAGE...] --logs LOG [LOG...] --blocks N --need K

IMAGEs are `blockrep export` outputs of the copies (primary and replicas); LOGs are the storm
logs (tests/clients/write_storm.py). For every block an acknowledged FLUSH covered, counts the
images that hold an intact payload of a write issued to that block with a seq at least the
covered one (what `write_storm.py verify` accepts for one image), and fails (exit 1), listing
them, if any such block is held by fewer than K images. Prints a JSON summary on success.
Used for sync-quorum, where a FLUSH promises a majority of the copies, not every one.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import write_storm as ws  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("images", nargs="+")
    p.add_argument("--logs", nargs="+", required=True)
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--need", type=int, required=True)
    a = p.parse_args()
    logs = ws.Logs(a.logs)
    imgs = [ws.read_image(i, a.blocks) for i in a.images]
    short = []
    held_by = {}
    for b, hc in sorted(logs.covered.items()):
        n = 0
        for img in imgs:
            found, err = ws.decode(img[b * ws.BLOCK : (b + 1) * ws.BLOCK])
            if err is None and found[0] == b and found[1] >= hc and found in logs.issued:
                n += 1
        held_by[n] = held_by.get(n, 0) + 1
        if n < a.need:
            short.append(
                "block %d: the flushed write seq %d is on %d of %d copies" % (b, hc, n, len(imgs))
            )
    if short:
        print("majority: %d block(s) on too few copies (need %d):" % (len(short), a.need), file=sys.stderr)
        for s in short[:30]:
            print("  " + s, file=sys.stderr)
        sys.exit(1)
    print(
        json.dumps(
            {
                "covered_blocks": len(logs.covered),
                "covered_writes": logs.covered_writes,
                "copies": len(imgs),
                "blocks_by_copies_holding": {str(k): v for k, v in sorted(held_by.items())},
            }
        )
    )


if __name__ == "__main__":
    main()
