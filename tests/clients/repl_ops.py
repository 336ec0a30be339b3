#!/usr/bin/python3
"""A line-driven libnbd client for the replication tests (run with /usr/bin/python3).

  repl_ops.py URI

Connects once to URI, prints one JSON line {"ok": true, "size": N}, then reads commands on
stdin, one per line, and answers each with one JSON line on stdout. The connection stays open
between commands, so a test can keep one client on a primary across a failover (the zombie
primary's client).

  write OFF FILE [fua]   pwrite the contents of FILE at OFF (with FUA if asked)
  flush                  FLUSH
  check OFF FILE         read len(FILE) bytes at OFF; "equal": whether they are FILE's bytes,
                         "zero": whether they are all zero
  quit                   disconnect (errors ignored) and exit

Every answer carries "op", "ok" (false when libnbd raised), "errno" and "error" (when it
failed) and "secs" (how long the command took, monotonic clock).
"""

import json
import sys
import time

import nbd


def main():
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    print(json.dumps({"ok": True, "size": h.get_size()}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        op = parts[0]
        if op == "quit":
            try:
                h.shutdown()
            except nbd.Error:
                pass
            break
        res = {"op": op}
        t = time.monotonic()
        try:
            if op == "write":
                with open(parts[2], "rb") as f:
                    data = f.read()
                flags = nbd.CMD_FLAG_FUA if len(parts) > 3 and parts[3] == "fua" else 0
                h.pwrite(data, int(parts[1]), flags)
            elif op == "flush":
                h.flush()
            elif op == "check":
                with open(parts[2], "rb") as f:
                    want = f.read()
                got = h.pread(len(want), int(parts[1]))
                res["equal"] = bytes(got) == want
                res["zero"] = not any(got)
            else:
                raise SystemExit("repl_ops: unknown command %r" % line)
            res["ok"] = True
        except nbd.Error as e:
            res["ok"] = False
            res["errno"] = e.errno
            res["error"] = e.string
        res["secs"] = time.monotonic() - t
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
