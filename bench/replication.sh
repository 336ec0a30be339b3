#!/usr/bin/env bash
# Replication tax: the same fio workloads against a single-node blockrep, a sync-all primary
# with 2 replicas on loopback, and qemu-nbd (writeback) as the peer, in one interleaved
# session on one disk. Medians of REPS runs; ratios against the single node.
#
#   bench/replication.sh                      3 reps x 10 s
#   REPS=1 RUNTIME=3 bench/replication.sh     smoke run
#
# Workloads: randwrite4k-qd32 (4k random writes, QD32), randwrite4k-qd1 (QD1),
# fsyncwrite4k (4k random write + FLUSH after each, QD1: every FLUSH is a barrier across the
# replicas). Everything runs on this machine: client, primary and both replicas share its
# cores, so the replicated numbers include the replicas' CPU, which separate hosts would not.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1GiB}
DATA=${BENCH_DATA_DIR:-$PWD/target/bench-data/replication}
OUT=${BENCH_RESULTS_DIR:-$PWD/target/bench-results}
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/blockrep
PORT=${PORT_BASE:-11950}
[[ ${BUILD:-1} == 1 ]] && cargo build --release --quiet
mkdir -p "$DATA" "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
CSV=$OUT/replication-$STAMP.csv
echo "server,workload,rep,iops,clat_p50_us,clat_p99_us" > "$CSV"
PIDS=()
# Waits for every server to exit: a peer still holding the port would answer the next run.
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
trap cleanup EXIT

wait_port() { for _ in $(seq 200); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

start() { # server -> sets URI
    rm -rf "$DATA"/*; mkdir -p "$DATA"
    case $1 in
      single)
        $BIN create "$DATA/p" --size "$SIZE" > /dev/null
        setsid $BIN serve "$DATA/p" --nbd 127.0.0.1:$PORT --metrics 127.0.0.1:0 > "$DATA/p.log" 2>&1 < /dev/null & PIDS+=($!)
        ;;
      sync-all-2)
        for r in 1 2; do
          $BIN create "$DATA/r$r" --size "$SIZE" > /dev/null
          setsid $BIN replica "$DATA/r$r" --listen 127.0.0.1:$((PORT+r)) --metrics 127.0.0.1:0 > "$DATA/r$r.log" 2>&1 < /dev/null & PIDS+=($!)
          wait_port $((PORT+r))
        done
        $BIN create "$DATA/p" --size "$SIZE" > /dev/null
        setsid $BIN serve "$DATA/p" --nbd 127.0.0.1:$PORT --metrics 127.0.0.1:0 \
            --replica r1=127.0.0.1:$((PORT+1)) --replica r2=127.0.0.1:$((PORT+2)) > "$DATA/p.log" 2>&1 < /dev/null & PIDS+=($!)
        ;;
      qemu-wb)
        truncate -s "$SIZE" "$DATA/img"
        setsid qemu-nbd -f raw --cache=writeback --aio=threads -t --shared=8 -b 127.0.0.1 -p $PORT "$DATA/img" > "$DATA/q.log" 2>&1 < /dev/null & PIDS+=($!)
        ;;
    esac
    wait_port $PORT
    sleep 1
    URI=nbd://127.0.0.1:$PORT/
}

run_fio() { # workload -> json on stdout
    local args
    case $1 in
      randwrite4k-qd32) args="--rw=randwrite --bs=4k --iodepth=32" ;;
      randwrite4k-qd1)  args="--rw=randwrite --bs=4k --iodepth=1" ;;
      fsyncwrite4k)     args="--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
    esac
    # shellcheck disable=SC2086
    fio --name=b --ioengine=nbd --uri="$URI" $args --size=1G --time_based --runtime="$RUNTIME" \
        --ramp_time=1 --norandommap --randrepeat=0 --output-format=json 2>/dev/null
}

SERVERS=(${SERVERS:-single sync-all-2 qemu-wb})
WORKLOADS=(${WORKLOADS:-randwrite4k-qd32 randwrite4k-qd1 fsyncwrite4k})
for rep in $(seq "$REPS"); do
  for s in "${SERVERS[@]}"; do
    for w in "${WORKLOADS[@]}"; do
      start "$s"
      if ! run_fio "$w" > "$DATA/../fio.json"; then
        echo "fio failed: $s $w rep $rep; server log:" >&2
        tail -20 "$DATA"/*.log >&2
        exit 1
      fi
      python3 - "$DATA/../fio.json" "$s" "$w" "$rep" >> "$CSV" <<'PY'
import json, sys
raw = open(sys.argv[1]).read()
d = json.loads(raw[raw.find("{"):])
j = d["jobs"][0]["write"]
pct = j["clat_ns"].get("percentile", {})
print(f"{sys.argv[2]},{sys.argv[3]},{sys.argv[4]},{j['iops']:.0f},"
      f"{pct.get('50.000000', 0)/1000:.0f},{pct.get('99.000000', 0)/1000:.0f}")
PY
      echo "[$(date +%T)] rep $rep $s $w: $(tail -1 "$CSV")"
      cleanup
    done
  done
done

python3 - "$CSV" <<'PY' | tee "${CSV%.csv}.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
servers = list(dict.fromkeys(r["server"] for r in rows))
workloads = list(dict.fromkeys(r["workload"] for r in rows))
med = {}
for s in servers:
    for w in workloads:
        xs = [r for r in rows if r["server"] == s and r["workload"] == w]
        if xs:
            med[s, w] = tuple(statistics.median(float(x[k]) for x in xs)
                              for k in ("iops", "clat_p50_us", "clat_p99_us"))
for w in workloads:
    print(f"\n**{w}** (median of {len([r for r in rows if r['workload'] == w and r['server'] == servers[0]])} runs)\n")
    print("| server | IOPS | clat p50 µs | clat p99 µs | × single node |")
    print("|---|---|---|---|---|")
    base = med.get(("single", w), (0,))[0]
    for s in servers:
        if (s, w) in med:
            i, p50, p99 = med[s, w]
            ratio = f"{i / base:.2f}" if base else "-"
            print(f"| {s} | {i:,.0f} | {p50:,.0f} | {p99:,.0f} | {ratio} |")
PY
