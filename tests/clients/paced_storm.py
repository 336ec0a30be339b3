#!/usr/bin/python3
"""write_storm.py with a write rate limit, for the recovery tests (run with /usr/bin/python3).

  paced_storm.py --rate WRITES_PER_SEC storm URI LOG --blocks N --seq-base B [...]

Everything after --rate is write_storm.py's own command line (the same storm, the same log
format, so `write_storm.py verify` checks its logs). The storm's 4 KiB writes are issued no
faster than --rate per second, so a replica that is away for a few seconds stays well inside
the primary's WAL retention budget (an unpaced storm writes tens of MiB per second).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nbd  # noqa: E402

import write_storm  # noqa: E402


def main():
    args = sys.argv[1:]
    if len(args) < 2 or args[0] != "--rate":
        sys.exit("usage: paced_storm.py --rate WRITES_PER_SEC storm URI LOG --blocks N ...")
    rate = float(args[1])
    if rate <= 0:
        sys.exit("paced_storm: --rate must be positive")
    interval = 1.0 / rate
    base = nbd.NBD

    class Paced(base):
        """An NBD handle whose writes are spaced `interval` apart on average."""

        _next = None

        def aio_pwrite(self, buf, offset, completion=None, flags=0):
            now = time.monotonic()
            if self._next is None:
                self._next = now
            if self._next > now:
                time.sleep(self._next - now)
            # Never bank more than a short burst after a slow moment.
            self._next = max(self._next, time.monotonic() - 0.05) + interval
            return base.aio_pwrite(self, buf, offset, completion=completion, flags=flags)

    nbd.NBD = Paced
    sys.argv = [os.path.join(os.path.dirname(__file__), "write_storm.py")] + args[2:]
    write_storm.main()


if __name__ == "__main__":
    main()
