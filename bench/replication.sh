#!/usr/bin/env bash
# Replication tax: the same fio workloads against a single-node blockrep, a sync-all primary
# with 2 replicas on loopback, and qemu-nbd (writeback) as the peer, in one interleaved
# session on one disk. Medians of REPS runs; ratios against the single node.
#
#   bench/replication.sh                      3 reps x 10 s
#   REPS=1 RUNTIME=3 bench/replication.sh     smoke run
#   CPU=1 WORKLOADS=randwrite4k-qd32 SERVERS="single sync-all-2" bench/replication.sh
#                                             where each write's CPU goes (below)
#
#   SPLIT=1 bench/replication.sh              replicas as if on other hosts (below)
#   REPLICA_DATA=/dev/shm/rb WORKLOADS=fsyncwrite4k bench/replication.sh
#                                             replicas' stores on tmpfs: what their disk costs
#   SERVERS="single sync-all-2 sync-all-2-mtls" bench/replication.sh
#                                             what mutual TLS between the nodes costs
#
# Servers: single (one node), sync-all-2 (a sync-all primary and 2 replicas, plaintext
# replication), sync-all-2-mtls (the same with --peer-tls-dir on every node: certificates from
# `blockrep certs`, made once per run), qemu-wb (qemu-nbd, writeback).
#
# With SPLIT=1 the client and the server under test (the primary; the single node; qemu-nbd)
# run on CPU 0 only and both replicas on CPU 1 only (taskset): the primary's host is one core
# that carries none of the replicas' work, as with replicas on other machines. The kernel's
# own threads (writeback, the journal) still run on either core, for every server alike.
#
# With CPU=1, every randwrite4k-qd32 run also samples, over 5 s in its middle, the CPU each
# blockrep process used, split by thread role (bench/cpu-split.py), and fio's own; the
# summary gives microseconds of CPU per write for each.
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
REPLICA_DATA=${REPLICA_DATA:-$DATA}
OUT=${BENCH_RESULTS_DIR:-$PWD/target/bench-results}
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/blockrep
PORT=${PORT_BASE:-11950}
if [[ ${SPLIT:-0} == 1 ]]; then ON_PRIMARY="taskset -c 0"; ON_REPLICAS="taskset -c 1"; else ON_PRIMARY=; ON_REPLICAS=; fi
[[ ${BUILD:-1} == 1 ]] && cargo build --release --quiet
mkdir -p "$DATA" "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
[[ ${SPLIT:-0} == 1 ]] && STAMP=$STAMP-split
CSV=$OUT/replication-$STAMP.csv
echo "server,workload,rep,iops,clat_p50_us,clat_p99_us" > "$CSV"
CPU_CSV=$OUT/replication-cpu-$STAMP.csv
if [[ ${CPU:-0} == 1 ]]; then echo "server,rep,iops,process,role,us_per_write" > "$CPU_CSV"; fi
CERTS=$OUT/replication-certs-$STAMP
tls_args() { # node name -> --peer-tls-dir/--name flags for sync-all-2-mtls
    echo "--peer-tls-dir $CERTS/$1 --name $1"
}
if [[ " ${SERVERS:-} " == *" sync-all-2-mtls "* ]]; then
    $BIN certs init "$CERTS/ca" > /dev/null
    for n in p r1 r2; do $BIN certs issue "$CERTS/ca" --node "$n" --out "$CERTS/$n" > /dev/null; done
fi
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
    rm -rf "$DATA"/* "$REPLICA_DATA"/r[12]; mkdir -p "$DATA" "$REPLICA_DATA"
    case $1 in
      single)
        $BIN create "$DATA/p" --size "$SIZE" > /dev/null
        setsid $ON_PRIMARY $BIN serve "$DATA/p" --nbd 127.0.0.1:$PORT --metrics 127.0.0.1:0 > "$DATA/p.log" 2>&1 < /dev/null & PIDS+=($!)
        ;;
      sync-all-2 | sync-all-2-mtls)
        local tls=0
        [[ $1 == sync-all-2-mtls ]] && tls=1
        for r in 1 2; do
          $BIN create "$REPLICA_DATA/r$r" --size "$SIZE" > /dev/null
          # shellcheck disable=SC2046 # the flags split on purpose
          setsid $ON_REPLICAS $BIN replica "$REPLICA_DATA/r$r" --listen 127.0.0.1:$((PORT+r)) --metrics 127.0.0.1:0 \
              $( ((tls)) && tls_args "r$r") > "$DATA/r$r.log" 2>&1 < /dev/null & PIDS+=($!)
          wait_port $((PORT+r))
        done
        $BIN create "$DATA/p" --size "$SIZE" > /dev/null
        # shellcheck disable=SC2046
        setsid $ON_PRIMARY $BIN serve "$DATA/p" --nbd 127.0.0.1:$PORT --metrics 127.0.0.1:0 \
            --replica r1=127.0.0.1:$((PORT+1)) --replica r2=127.0.0.1:$((PORT+2)) \
            $( ((tls)) && tls_args p) > "$DATA/p.log" 2>&1 < /dev/null & PIDS+=($!)
        ;;
      qemu-wb)
        truncate -s "$SIZE" "$DATA/img"
        setsid $ON_PRIMARY qemu-nbd -f raw --cache=writeback --aio=threads -t --shared=8 -b 127.0.0.1 -p $PORT "$DATA/img" > "$DATA/q.log" 2>&1 < /dev/null & PIDS+=($!)
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
    $ON_PRIMARY fio --name=b --ioengine=nbd --uri="$URI" $args --size=1G --time_based --runtime="$RUNTIME" \
        --ramp_time=1 --norandommap --randrepeat=0 --output-format=json 2>/dev/null
}

SERVERS=(${SERVERS:-single sync-all-2 qemu-wb})
WORKLOADS=(${WORKLOADS:-randwrite4k-qd32 randwrite4k-qd1 fsyncwrite4k})
for rep in $(seq "$REPS"); do
  for s in "${SERVERS[@]}"; do
    for w in "${WORKLOADS[@]}"; do
      start "$s"
      SAMPLER=
      if [[ ${CPU:-0} == 1 && $w == randwrite4k-qd32 && $s != qemu-wb ]]; then
        case $s in
          single) NAMES=(primary=${PIDS[0]}) ;;
          sync-all-2*) NAMES=(replica1=${PIDS[0]} replica2=${PIDS[1]} primary=${PIDS[2]}) ;;
        esac
        (sleep 3; python3 bench/cpu-split.py 5 "${NAMES[@]}") > "$DATA/../cpu.json" & SAMPLER=$!
      fi
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
      if [[ -n $SAMPLER ]]; then
        wait "$SAMPLER"
        python3 - "$DATA/../fio.json" "$DATA/../cpu.json" "$s" "$rep" >> "$CPU_CSV" <<'PY'
import json, sys
raw = open(sys.argv[1]).read()
job = json.loads(raw[raw.find("{"):])["jobs"][0]
cpu = json.load(open(sys.argv[2]))
iops, window = job["write"]["iops"], cpu.pop("window")
writes = iops * window
fio = (job["usr_cpu"] + job["sys_cpu"]) / 100 * window
machine = cpu.pop("machine")
listed = fio
for proc, roles in cpu.items():
    for role, secs in roles.items():
        listed += secs
        print(f"{sys.argv[3]},{sys.argv[4]},{iops:.0f},{proc},{role},{secs / writes * 1e6:.2f}")
print(f"{sys.argv[3]},{sys.argv[4]},{iops:.0f},fio,client,{fio / writes * 1e6:.2f}")
rest = max(0.0, machine["busy"] - listed)
print(f"{sys.argv[3]},{sys.argv[4]},{iops:.0f},machine,kernel threads and the rest,{rest / writes * 1e6:.2f}")
idle = machine["total"] - machine["busy"]
print(f"{sys.argv[3]},{sys.argv[4]},{iops:.0f},machine,idle,{idle / writes * 1e6:.2f}")
PY
      fi
      echo "[$(date +%T)] rep $rep $s $w: $(tail -1 "$CSV")"
      cleanup
    done
  done
done

# Replica stores on tmpfs hold RAM until removed.
if [[ $REPLICA_DATA != "$DATA" ]]; then rm -rf "$REPLICA_DATA"/r[12]; fi

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

if [[ ${CPU:-0} != 1 ]]; then exit 0; fi
python3 - "$CPU_CSV" <<'PY' | tee "${CPU_CSV%.csv}.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
servers = list(dict.fromkeys(r["server"] for r in rows))
keys = list(dict.fromkeys((r["process"], r["role"]) for r in rows))
print("\n**CPU per 4 KiB write, randwrite4k-qd32** (µs, median over runs)\n")
print("| process | role | " + " | ".join(servers) + " |")
print("|---|---|" + "---|" * len(servers))
def med(s, k):
    xs = [float(r["us_per_write"]) for r in rows
          if r["server"] == s and (r["process"], r["role"]) == k]
    return statistics.median(xs) if xs else None
for k in keys:
    cells = [med(s, k) for s in servers]
    print(f"| {k[0]} | {k[1]} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
totals = []
for s in servers:
    runs = {r["rep"] for r in rows if r["server"] == s}
    per = [sum(float(r["us_per_write"]) for r in rows if r["server"] == s and r["rep"] == rep
               and r["role"] != "idle") for rep in runs]
    totals.append(statistics.median(per))
print("| **all** | busy | " + " | ".join(f"**{t:.1f}**" for t in totals) + " |")
iops = [statistics.median(float(r["iops"]) for r in rows if r["server"] == s) for s in servers]
print("| | IOPS | " + " | ".join(f"{i:,.0f}" for i in iops) + " |")
PY
