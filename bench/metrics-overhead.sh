#!/usr/bin/env bash
# What recording metrics costs the request path: the same single-node blockrep, once with
# metrics on (the default; /metrics scraped every second while fio runs, as Prometheus would)
# and once with `--metrics off` (no endpoint, nothing recorded per request), alternating,
# fresh store each run. Medians of REPS runs; the ratio on/off is the overhead.
#
#   bench/metrics-overhead.sh                   5 reps x 10 s x 2 workloads
#   REPS=1 RUNTIME=3 bench/metrics-overhead.sh  smoke run
#
# Workloads: randread4k (4 KiB random reads, QD32) and randwrite4k (4 KiB random writes,
# QD32): the highest request rates this machine reaches, so a per-request cost shows most.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-5}
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1GiB}
DATA=${BENCH_DATA_DIR:-$PWD/target/bench-data/metrics}
OUT=${BENCH_RESULTS_DIR:-$PWD/target/bench-results}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/release/blockrep
PORT=${PORT_BASE:-12950}
ADMIN=$((PORT + 1))
[[ ${BUILD:-1} == 1 ]] && cargo build --release --quiet --bin blockrep
mkdir -p "$DATA" "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
CSV=$OUT/metrics-overhead-$STAMP.csv
echo "metrics,workload,rep,iops,clat_p50_us,clat_p99_us,scrapes" > "$CSV"
PIDS=()
# Waits for every server to exit: one still holding the port would answer the next run.
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
trap cleanup EXIT

wait_port() { for _ in $(seq 200); do (echo -n > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

start() { # on|off
    rm -rf "$DATA/p"
    $BIN create "$DATA/p" --size "$SIZE" > /dev/null
    local m=127.0.0.1:$ADMIN
    [[ $1 == off ]] && m=off
    setsid "$BIN" serve "$DATA/p" --nbd 127.0.0.1:$PORT --metrics "$m" > "$DATA/p.log" 2>&1 < /dev/null &
    PIDS+=($!)
    wait_port $PORT
    # Reads must read real data: fill the first 256 MiB, then let the checkpoint settle.
    fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/" --rw=write --bs=1M \
        --iodepth=8 --size=256M --output=/dev/null
    sleep 2
}

# Scrapes /metrics once a second until killed; prints how many scrapes succeeded.
scraper() {
    local n=0
    trap 'echo $n; exit 0' TERM
    while true; do
        curl -sf "http://127.0.0.1:$ADMIN/metrics" > /dev/null && n=$((n + 1))
        sleep 1 & wait $!
    done
}

run_fio() { # workload -> json on stdout
    local args
    case $1 in
      randread4k)  args="--rw=randread --bs=4k --iodepth=32" ;;
      randwrite4k) args="--rw=randwrite --bs=4k --iodepth=32" ;;
    esac
    # shellcheck disable=SC2086
    fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/" $args --size=256M --time_based \
        --runtime="$RUNTIME" --ramp_time=1 --norandommap --randrepeat=0 --output-format=json
}

WORKLOADS=(${WORKLOADS:-randread4k randwrite4k})
for rep in $(seq "$REPS"); do
  for m in on off; do
    for w in "${WORKLOADS[@]}"; do
      start "$m"
      scrapes=0
      if [[ $m == on ]]; then
        scraper > "$DATA/scrapes" & SCRAPER=$!
      fi
      if ! run_fio "$w" > "$DATA/fio.json" 2> "$DATA/fio.err"; then
        echo "fio failed: metrics $m $w rep $rep" >&2
        cat "$DATA/fio.err" >&2; tail -20 "$DATA/p.log" >&2
        exit 1
      fi
      if [[ $m == on ]]; then
        kill -TERM "$SCRAPER"; wait "$SCRAPER" || true
        scrapes=$(cat "$DATA/scrapes")
        if (( scrapes < RUNTIME / 2 )); then
          echo "only $scrapes scrapes of /metrics succeeded during a ${RUNTIME}s run" >&2
          exit 1
        fi
      fi
      python3 - "$DATA/fio.json" "$m" "$w" "$rep" "$scrapes" >> "$CSV" <<'PY'
import json, sys
raw = open(sys.argv[1]).read()
d = json.loads(raw[raw.find("{"):])
j = d["jobs"][0]
io = j["read"] if j["read"]["io_bytes"] else j["write"]
pct = io["clat_ns"].get("percentile", {})
print(f"{sys.argv[2]},{sys.argv[3]},{sys.argv[4]},{io['iops']:.0f},"
      f"{pct.get('50.000000', 0)/1000:.0f},{pct.get('99.000000', 0)/1000:.0f},{sys.argv[5]}")
PY
      echo "[$(date +%T)] rep $rep metrics=$m $w: $(tail -1 "$CSV")"
      cleanup
    done
  done
done

python3 - "$CSV" "$(git describe --always --dirty)" <<'PY' | tee "${CSV%.csv}.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
workloads = list(dict.fromkeys(r["workload"] for r in rows))
print(f"# Metrics overhead ({sys.argv[1]}, blockrep {sys.argv[2]})\n")
print("| workload | IOPS metrics on | IOPS metrics off | on ÷ off | p99 µs on | p99 µs off | runs (on / off) |")
print("|---|---|---|---|---|---|---|")
for w in workloads:
    def pick(m, k):
        return [float(r[k]) for r in rows if r["workload"] == w and r["metrics"] == m]
    on, off = statistics.median(pick("on", "iops")), statistics.median(pick("off", "iops"))
    p_on, p_off = statistics.median(pick("on", "clat_p99_us")), statistics.median(pick("off", "clat_p99_us"))
    runs = " / ".join(", ".join(f"{v:,.0f}" for v in pick(m, "iops")) for m in ("on", "off"))
    print(f"| {w} | {on:,.0f} | {off:,.0f} | {on / off:.3f} | {p_on:,.0f} | {p_off:,.0f} | {runs} |")
PY
