#!/usr/bin/env bash
# Failover time of an etcd-led volume under repeated kill -9 of its primary.
#
#   bench/failover.sh                 20 kills, lease TTL 3 s
#   KILLS=50 TTL=15 bench/failover.sh   the default TTL
#
# Method: one etcd (Debian's 3.4) and three `blockrep node` processes (sync-all, --etcd-ttl
# $TTL, 64 MiB volume) on loopback, and tests/clients/failover_writer.py writing 4 KiB
# blocks with a FLUSH every 4 writes to whichever node serves, logging each acknowledgement
# with the wall clock. Each round: wait until all three nodes are in etcd's in-sync set and
# the writer has had 20 FLUSHes acknowledged by the leader; kill -9 the leader and note the
# instant; the failover time is from that instant to the first FLUSH acknowledged by another
# node. The killed node is restarted on its store (it rejoins as a replica) before the next
# round. Reported: every time, then min, median, p90 and max.
#
# What bounds it: etcd expires the dead leader's lease TTL after its last keep-alive was
# received (keep-alives go every TTL/3), so the key goes between 2/3 TTL and TTL after the
# kill; the next candidate sees it through its watch, campaigns, promotes (asks the other
# replica), and the writer, retrying every 50 ms, reconnects. BLOCKREP_BIN picks the binary
# (default target/release/blockrep).
set -euo pipefail

KILLS=${KILLS:-20}
TTL=${TTL:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BLOCKREP_BIN:-$ROOT/target/release/blockrep}
PY=/usr/bin/python3
WRITER=$ROOT/tests/clients/failover_writer.py
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release (or set BLOCKREP_BIN)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/blockrep-failover.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ECLIENT=$(port); EPEER=$(port)
etcd --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$ECLIENT" \
    --advertise-client-urls "http://127.0.0.1:$ECLIENT" \
    --listen-peer-urls "http://127.0.0.1:$EPEER" \
    --initial-advertise-peer-urls "http://127.0.0.1:$EPEER" \
    --initial-cluster "default=http://127.0.0.1:$EPEER" >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
disown $!
ENDPOINT=http://127.0.0.1:$ECLIENT
until etcdctl --endpoints "$ENDPOINT" endpoint health >/dev/null 2>&1; do sleep 0.2; done

declare -a NBD LISTEN METRICS NODE_PID
for i in 1 2 3; do NBD[$i]=$(port); LISTEN[$i]=$(port); METRICS[$i]=$(port); done

start_node() {
    local i=$1
    BLOCKREP_LOG=info "$BIN" node "$WORK/n$i" --size 64MiB --volume bench --name "n$i" \
        --etcd-endpoints "$ENDPOINT" --etcd-ttl "$TTL" --nbd "127.0.0.1:${NBD[$i]}" \
        --listen "127.0.0.1:${LISTEN[$i]}" --metrics "127.0.0.1:${METRICS[$i]}" \
        >>"$WORK/n$i.log" 2>&1 &
    NODE_PID[$i]=$!
    PIDS+=($!)
    disown $!
}

leader() {
    for i in 1 2 3; do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${METRICS[$i]}/v1/primary")" = 200 ]; then
            echo "$i"; return 0
        fi
    done
    return 1
}

in_sync() {
    "$BIN" ctl --etcd-endpoints "$ENDPOINT" --volume bench list --json 2>/dev/null |
        $PY -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if v["leader"] and len(v["insync"]["members"])==3 else 1)'
}

flushes_by() { # URI AFTER: FLUSHes acknowledged by URI after the wall-clock instant AFTER
    # The writer creates its log on its first connection: until then, none.
    [ -f "$WORK/writer.log" ] || { echo 0; return; }
    awk -v u="$1" -v t="$2" '$1=="F" && $4==u && $3>t {n++} END {print n+0}' "$WORK/writer.log"
}

start_node 1
until leader >/dev/null; do sleep 0.1; done
start_node 2; start_node 3
until in_sync; do sleep 0.2; done
URIS=(); for i in 1 2 3; do URIS+=("nbd://127.0.0.1:${NBD[$i]}"); done
$PY "$WRITER" write "$WORK/writer.log" "${URIS[@]}" 2>"$WORK/writer.stderr" &
PIDS+=($!)
disown $!

TIMES=()
for round in $(seq 1 "$KILLS"); do
    until in_sync; do sleep 0.2; done
    L=$(until leader; do sleep 0.1; done)
    until [ "$(flushes_by "nbd://127.0.0.1:${NBD[$L]}" 0)" -ge 20 ]; do sleep 0.1; done
    KILLED=$($PY -c 'import time; print(f"{time.time():.6f}")')
    kill -9 "${NODE_PID[$L]}"
    FIRST=""
    while [ -z "$FIRST" ]; do
        sleep 0.05
        FIRST=$(awk -v u="nbd://127.0.0.1:${NBD[$L]}" -v t="$KILLED" \
            '$1=="F" && $4!=u && $3>t {print $3; exit}' "$WORK/writer.log")
    done
    T=$($PY -c "print(f'{$FIRST - $KILLED:.3f}')")
    TIMES+=("$T")
    echo "round $round: killed n$L, first FLUSH on another node after $T s"
    start_node "$L"
done

$PY - "${TIMES[@]}" <<'EOF'
import statistics, sys
t = sorted(float(x) for x in sys.argv[1:])
p90 = t[min(len(t) - 1, int(round(0.9 * (len(t) - 1))))]
print(f"failover over {len(t)} kills: min {t[0]:.3f} s, median {statistics.median(t):.3f} s, "
      f"p90 {p90:.3f} s, max {t[-1]:.3f} s")
EOF
