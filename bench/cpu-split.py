#!/usr/bin/env python3
"""CPU time of processes, split by thread role, over a window.

    cpu-split.py SECONDS NAME=PID ...

Prints one JSON object: for each NAME, the CPU seconds (user + system) its threads used in
the window, grouped by role from the thread name (blockrep-rt and the main thread: runtime;
blockrep-flushe: flusher; blockrep-wal: wal; blockrep-placer: placer; iou-wrk-*: io_uring workers; threads that
exited in the window: exited), plus "machine": the busy and total CPU seconds of the whole
machine (from /proc/stat), so that what no listed process used (fio, kernel threads) shows.
"""
import json
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def role(comm):
    if comm.startswith("blockrep-flushe"):
        return "flusher"
    if comm.startswith("blockrep-placer"):
        return "placer"
    if comm.startswith("blockrep-wal"):
        return "wal"
    if comm.startswith("iou-wrk"):
        return "io_uring workers"
    return "runtime"


def stat_cpu(path):
    # utime and stime are fields 14 and 15; the command name may hold spaces.
    fields = open(path).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def snapshot(pid):
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            threads[tid] = (role(comm), stat_cpu(f"/proc/{pid}/task/{tid}/stat"))
        except OSError:
            pass  # the thread exited meanwhile
    return stat_cpu(f"/proc/{pid}/stat"), threads


def machine():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = f[3] + f[4]
    return (sum(f) - idle) / TICK, sum(f) / TICK


def main():
    window = float(sys.argv[1])
    pids = dict(a.split("=", 1) for a in sys.argv[2:])
    before = {n: snapshot(p) for n, p in pids.items()}
    m0 = machine()
    time.sleep(window)
    after = {n: snapshot(p) for n, p in pids.items()}
    m1 = machine()
    out = {"window": window}
    for n in pids:
        (t0, th0), (t1, th1) = before[n], after[n]
        groups = {}
        for tid, (r, c) in th1.items():
            groups[r] = groups.get(r, 0.0) + c - th0.get(tid, (r, 0.0))[1]
        groups["exited"] = max(0.0, (t1 - t0) - sum(groups.values()))
        out[n] = groups
    out["machine"] = {"busy": m1[0] - m0[0], "total": m1[1] - m0[1]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
