#!/usr/bin/env bash
# Rebuild and catch-up: how fast a replica is brought back, and what clients see meanwhile.
#
#   bench/rebuild.sh                          3 reps, 256 MiB volume
#   SIZE_MIB=64 REPS=1 bench/rebuild.sh       smoke run
#
# Goals (from the issue): a rebuild runs at >= 80% of the loopback copy rate of `nbdcopy`
# between two local NBD servers, and the client p99 write latency during a rate-limited
# rebuild stays within 2x of steady state. The summary prints both ratios.
#
# Scenarios, run in this order in every rep (reps interleaved: rep 1 of all, then rep 2, ...);
# every rep starts from a fresh primary store and a fresh random fill:
#   nbdcopy-file       peer: `nbdcopy --flush` from `nbdkit file` (the fully allocated random
#                      image, read-only) to `nbdkit file` over an empty sparse file
#   nbdcopy-blockrep   peer: the same from the blockrep primary's export to `nbdkit file`
#   rebuild-idle       a blank replica r1 (`blockrep create`, same --size; it joins the volume
#                      of the first primary that connects) is started next to a primary holding
#                      SIZE_MIB of random data (written with nbdcopy --flush, then the script
#                      waits until a checkpoint has emptied the WAL); no client I/O
#   steady             the fio writer below for STEADY_S s against the primary with r1 in sync:
#                      the latency baseline
#   rebuild-fio        r1 wiped to a blank store and restarted while the fio writer runs
#   catchup-idle       r1 in sync, stopped (SIGTERM), CATCHUP_MIB written (nbdcopy --flush of a
#                      random image at offset 0), r1 started again; the primary's log must say
#                      `catching up from` and must not say `rebuilding from our base image`
#   catchup-fio        the same with the fio writer running
#   rebuild-fio-limited  as rebuild-fio, with the primary restarted with --rebuild-rate: REBUILD_RATE_MIB
#                      if set, else 50% of this rep's rebuild-idle rate (the rate used is in the CSV)
#   scratch-50         (the primary restarted with --rebuild-rate INTERRUPT_RATE_MIB, so that half
#                      way lasts long enough to be caught) a blank r1 is SIGKILLed once its durable
#                      rebuild cursor (`rebuild_cursor_bytes` in r1's /v1/status) passes 50% of
#                      the data, wiped to a blank store and started again: the rebuild from
#                      scratch an interruption cost before rebuilds could resume
#   resume-50          the same interruption, r1 started again on its store: the rebuild resumes
#                      from its cursor. For both, seconds run from the restarted r1's
#                      `rebuilding from our base image` line to `rebuilt`, wall_s from the
#                      restart; mib is what the primary sent after the restart
#                      (`blockrep_rebuild_sent_bytes_total`). No fio load (timings only).
#
# Timing: from the primary's own log timestamps (NO_COLOR, µs resolution). A rebuild runs from
# `rebuilding from our base image replica=r1` to `rebuilt replica=r1 state="in_sync"`, a
# catch-up from `catching up from A to B replica=r1` to `caught up replica=r1`. Both start
# lines are written at the handshake, so the primary's reconnect backoff (up to 2 s) is not
# counted; wall_s in the CSV is the time from starting r1 to the in-sync line, backoff
# included. Rebuild MiB/s = data in the base image (the primary's `base image sent (N MiB of
# data)` line) / seconds. Catch-up MiB/s = lag_mib / seconds, lag_mib being the primary's
# `lag_bytes` for r1 just before r1 is restarted (CATCHUP_MIB, plus what fio wrote during its
# ramp in catchup-fio; the script checks it is at least CATCHUP_MIB). Writes the fio job makes
# inside the window are extra work, not counted in MiB/s.
#
# The fio writer: fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=8 --rate=FIO_RATE over
# the whole volume, --time_based, with per-write latency logs (--write_lat_log,
# --log_unix_epoch=1). It starts RAMP s before r1 does and is stopped with SIGTERM (fio then
# writes its report) once r1 is in sync. The latency is fio's total latency per write (`lat`:
# from fio taking the write to its completion, what the client sees); exact p50/p99 over the
# writes that completed inside the rebuild / catch-up window, for `steady` over the run minus
# its first RAMP s. clat p99 is also reported, but with the nbd engine (no commit hook) fio's
# clock for clat starts after nbd_aio_pwrite returns, so clat misses part of the round trip
# (its p50 reads a few µs). The goal ratio uses lat p99. Short windows hold few writes
# (writes_in_window, 2048/s at 8m): a p99 over a few hundred is noisy. The script fails if fio
# exits early, reports a job error, or logged no writes.
#
# The primary runs with --commit best-effort: the fill and the catch-up writes FLUSH while r1
# is away, which sync-all would fail. The fio job sends no FLUSH, so the commit mode does not
# change the latency measured. Everything runs on this machine (client, primary, replica and
# the peers share its cores and one disk): loopback numbers, not network numbers.
#
# Environment:
#   REPS (3)  SIZE_MIB (256)  CATCHUP_MIB (32; must fit the WAL retention budget, half the
#             WAL)  WAL_SIZE (256MiB)  STEADY_S (10)  RAMP (1 s)  FIO_RATE (8m)
#   REBUILD_RATE_MIB          fixed --rebuild-rate in MiB/s for rebuild-fio-limited
#   INTERRUPT_RATE_MIB (64)   --rebuild-rate in MiB/s for scratch-50 and resume-50
#   BENCH_DATA_DIR            stores, images (default target/bench-data/rebuild; one disk)
#   BENCH_RESULTS_DIR         default target/bench-results
#   PORT_BASE (12950)         127.0.0.1:PORT_BASE .. +5
#   BLOCKREP                  binary (default $CARGO_TARGET_DIR or target, /release/blockrep)
#   BUILD (1)                 0 = do not run cargo build --release first
#
# Output: target/bench-results/rebuild-<stamp>.csv (one row per scenario x rep), .md (medians,
# the two ratios, tool versions, blockrep commit; also printed), and fio JSON and server logs
# under rebuild-<stamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

REPS=${REPS:-3}
SIZE_MIB=${SIZE_MIB:-256}
CATCHUP_MIB=${CATCHUP_MIB:-32}
WAL_SIZE=${WAL_SIZE:-256MiB}
STEADY_S=${STEADY_S:-10}
RAMP=${RAMP:-1}
FIO_RATE=${FIO_RATE:-8m}
REBUILD_RATE_MIB=${REBUILD_RATE_MIB:-}
INTERRUPT_RATE_MIB=${INTERRUPT_RATE_MIB:-64}
DATA_DIR=${BENCH_DATA_DIR:-$ROOT/target/bench-data/rebuild}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$ROOT/target/bench-results}
PORT_BASE=${PORT_BASE:-12950}
BUILD=${BUILD:-1}
BLOCKREP=${BLOCKREP:-${CARGO_TARGET_DIR:-$ROOT/target}/release/blockrep}
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
export NO_COLOR=1 # plain server logs: the timestamps are parsed

NBD_P=$PORT_BASE          # primary NBD
ADMIN_P=$((PORT_BASE + 1)) # primary metrics/status
REPL_R1=$((PORT_BASE + 2)) # r1 replication
ADMIN_R1=$((PORT_BASE + 3))
PEER_SRC=$((PORT_BASE + 4))
PEER_DST=$((PORT_BASE + 5))

die() {
    echo "rebuild: error: $*" >&2
    exit 1
}
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

for tool in fio nbdkit nbdcopy nbdinfo python3 setsid ss curl; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install fio nbdkit libnbd-bin curl)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
for p in $(seq "$PORT_BASE" $((PORT_BASE + 5))); do
    [[ -z $(ss -Htln "sport = :$p") ]] || die "port $p is already in use; set PORT_BASE"
done
((CATCHUP_MIB < SIZE_MIB)) || die "CATCHUP_MIB must be below SIZE_MIB"

STAMP=$(date +%Y%m%d-%H%M%S)
RUN_DIR=$RESULTS_DIR/rebuild-$STAMP
CSV=$RESULTS_DIR/rebuild-$STAMP.csv
MD=$RESULTS_DIR/rebuild-$STAMP.md
mkdir -p "$DATA_DIR" "$RUN_DIR"

# ------------------------------------------------------------------ processes we started
declare -A PIDS=()
alive() { # pid: running (an exited child that is not reaped yet is a zombie: not running)
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $st != Z* ]]
}
stop() { # name [signal]: signal, wait up to 30 s (then SIGKILL), reap
    local name=$1 sig=${2:-TERM} pid
    pid=${PIDS[$name]:-}
    [[ -n $pid ]] || return 0
    kill -"$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 300); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "$name (pid $pid) ignored SIG$sig for 30 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$name]"
}
cleanup() {
    local n
    for n in fio "${!PIDS[@]}"; do stop "$n"; done
    rm -rf "$DATA_DIR/p" "$DATA_DIR/r1" "$DATA_DIR/dst.img" "$RUN_DIR"/*_{clat,lat,slat}.1.log
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ setup
if [[ $BUILD == 1 ]]; then
    log "cargo build --release --bin blockrep"
    cargo build --release --bin blockrep >&2
fi
[[ -x $BLOCKREP ]] || die "$BLOCKREP missing (cargo build --release)"

image() { # MiB -> path of a random image of that size (kept and reused)
    local img=$DATA_DIR/random-${1}M.img
    if [[ ! -f $img || $(stat -c %s "$img") -ne $(($1 << 20)) ]]; then
        log "writing $img ($1 MiB of random data)"
        head -c $(($1 << 20)) /dev/urandom >"$img.tmp"
        mv "$img.tmp" "$img"
    fi
    echo "$img"
}
IMAGE=$(image "$SIZE_MIB")
CATCHUP_IMAGE=$(image "$CATCHUP_MIB")

wait_nbd() { # port name
    for _ in $(seq 300); do
        nbdinfo --size "nbd://127.0.0.1:$1/" >/dev/null 2>&1 && return 0
        alive "${PIDS[$2]}" || break
        sleep 0.1
    done
    die "$2 did not come up on port $1 (log: $RUN_DIR/$2.log)"
}
wait_port() { # port name
    for _ in $(seq 300); do
        [[ -n $(ss -Htln "sport = :$1") ]] && return 0 # no probe connection: r1 would log it
        alive "${PIDS[$2]}" || break
        sleep 0.1
    done
    die "$2 did not listen on port $1 (log: $RUN_DIR/$2.log)"
}
nbdkit_file() { # name port file [-r]
    echo "=== $1: nbdkit file $3" >>"$RUN_DIR/$1.log"
    setsid nbdkit -f -p "$2" -i 127.0.0.1 ${4:+"$4"} file "$3" </dev/null >>"$RUN_DIR/$1.log" 2>&1 &
    PIDS[$1]=$!
    wait_nbd "$2" "$1"
}

P_LOG=$RUN_DIR/primary.log
start_primary() { # rebuild-rate bytes/s (0 = none)
    echo "=== primary --rebuild-rate $1" >>"$P_LOG"
    setsid "$BLOCKREP" serve "$DATA_DIR/p" --nbd "127.0.0.1:$NBD_P" --metrics "127.0.0.1:$ADMIN_P" \
        --replica "r1=127.0.0.1:$REPL_R1" --commit best-effort --rebuild-rate "$1" \
        </dev/null >>"$P_LOG" 2>&1 &
    PIDS[primary]=$!
    wait_nbd "$NBD_P" primary
}
start_r1() { # [blank]
    if [[ ${1:-} == blank ]]; then
        rm -rf "$DATA_DIR/r1"
        "$BLOCKREP" create "$DATA_DIR/r1" --size "${SIZE_MIB}MiB" --wal-size "$WAL_SIZE" \
            >>"$RUN_DIR/r1.log" 2>&1 || die "blockrep create r1 failed"
    fi
    setsid "$BLOCKREP" replica "$DATA_DIR/r1" --listen "127.0.0.1:$REPL_R1" \
        --metrics "127.0.0.1:$ADMIN_R1" </dev/null >>"$RUN_DIR/r1.log" 2>&1 &
    PIDS[r1]=$!
    R1_STARTED=$(date +%s.%N)
    wait_port "$REPL_R1" r1
}
status() { # python expression over the primary's /v1/status JSON `s` and r1's entry `r`
    curl -sf "http://127.0.0.1:$ADMIN_P/v1/status" | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = next(x for x in s["replicas"] if x["name"] == "r1")
print(eval(sys.argv[1]))' "$1"
}
wait_wal_empty() {
    for _ in $(seq 600); do
        [[ $(status 's["wal_used_bytes"]' 2>/dev/null) == 0 ]] && return 0
        sleep 0.1
    done
    die "the primary's WAL did not empty in 60 s (log: $P_LOG)"
}
log_lines() { wc -l <"$P_LOG"; }
# Waits for the line with `pat` (fixed string, after line `from`) in the primary's log.
wait_log() { # from pattern timeout-s
    local deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        tail -n +"$(($1 + 1))" "$P_LOG" | grep -qF -- "$2" && return 0
        alive "${PIDS[primary]}" || die "the primary exited (log: $P_LOG)"
        alive "${PIDS[r1]}" || die "r1 exited (log: $RUN_DIR/r1.log)"
        if [[ -n ${PIDS[fio]:-} ]] && ! alive "${PIDS[fio]}"; then
            die "fio exited before r1 was in sync (see $RUN_DIR/*.fio.err)"
        fi
        sleep 0.1
    done
    die "no '$2' in the primary's log after $3 s (log: $P_LOG)"
}
# Epoch seconds of the first line with `pat` after line `from`, in the primary's log.
log_time() { # from pattern
    tail -n +"$(($1 + 1))" "$P_LOG" | grep -F -m1 -- "$2" | python3 -c '
import sys, datetime
line = sys.stdin.readline()
ts = line.split()[0].rstrip("Z")
if not line:
    sys.exit(0)
print(datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp())'
}

FIO_ARGS=(--name=w --ioengine=nbd "--uri=nbd://127.0.0.1:$NBD_P/" --rw=randwrite --bs=4k
    --iodepth=8 "--rate=$FIO_RATE" "--size=$SIZE_BYTES" --time_based --norandommap
    --randrepeat=0 --log_unix_epoch=1 --output-format=json)
start_fio() { # tag runtime-s
    fio "${FIO_ARGS[@]}" --runtime="$2" --write_lat_log="$RUN_DIR/$1" \
        --output="$RUN_DIR/$1.json" >"$RUN_DIR/$1.fio.err" 2>&1 &
    PIDS[fio]=$!
}
stop_fio() { # tag: SIGTERM (fio ends the job and writes its report), then check the report
    alive "${PIDS[fio]}" || die "fio $1 ended early (see $RUN_DIR/$1.fio.err)"
    stop fio TERM
    check_fio "$1"
}
check_fio() { # tag
    python3 - "$RUN_DIR/$1.json" <<'PY' || die "fio $1 failed (see $RUN_DIR/$1.fio.err)"
import json, sys
t = open(sys.argv[1]).read()
job = json.loads(t[t.index("{"):])["jobs"][0]
if job.get("error") or not job["write"]["total_ios"]:
    raise SystemExit(f"fio job error {job.get('error')}, {job['write']['total_ios']} writes")
PY
}
# Total-latency p50 and p99, clat p99 (µs) and the number of writes, over the writes that
# completed in [t0, t1] (epoch seconds).
lat_window() { # tag t0 t1
    python3 - "$RUN_DIR/$1" "$2" "$3" <<'PY'
import sys
prefix, t0, t1 = sys.argv[1], float(sys.argv[2]) * 1000, float(sys.argv[3]) * 1000
def window(kind):
    with open(f"{prefix}_{kind}.1.log") as f:
        return sorted(int(x[1]) for x in (l.split(",") for l in f)
                      if len(x) > 2 and x[2].strip() == "1" and t0 <= int(x[0]) <= t1)
lat, clat = window("lat"), window("clat")
pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] / 1000 if xs else 0
print(f"{pct(lat, 0.50):.0f} {pct(lat, 0.99):.0f} {pct(clat, 0.99):.0f} {len(lat)}")
PY
    rm -f "$RUN_DIR/$1"_{clat,lat,slat}.1.log
}

echo "rep,scenario,mib,seconds,mib_s,rebuild_rate_mib_s,base_s,lag_mib,lat_p50_us,lat_p99_us,clat_p99_us,writes_in_window,wall_s" >"$CSV"
row() { echo "$*" >>"$CSV"; log "  $*"; }
rate() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.1f}')" "$@"; }
sub() { python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.3f}')" "$@"; }

# ------------------------------------------------------------------ scenarios
peer_copy() { # scenario src-uri
    rm -f "$DATA_DIR/dst.img"
    truncate -s "$SIZE_BYTES" "$DATA_DIR/dst.img"
    nbdkit_file peer-dst "$PEER_DST" "$DATA_DIR/dst.img"
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy --flush "$2" "nbd://127.0.0.1:$PEER_DST/" >>"$RUN_DIR/$1.log" 2>&1 \
        || die "nbdcopy $1 failed (log: $RUN_DIR/$1.log)"
    t1=$(date +%s.%N)
    stop peer-dst
    cmp -s "$IMAGE" "$DATA_DIR/dst.img" || die "$1: the copy differs from the image"
    rm -f "$DATA_DIR/dst.img"
    local s
    s=$(sub "$t1" "$t0")
    row "$rep,$1,$SIZE_MIB,$s,$(rate "$SIZE_MIB" "$s"),,,,,,,,$s"
}

# Starts a blank r1 (with the fio writer running if tag is set) and records the rebuild.
rebuild() { # scenario rate-mib (0: none) fio(0/1)
    local sc=$1 from t0 t1 base_mib base_s s p50="" p99="" c99="" n="" wall
    stop r1
    if [[ $3 == 1 ]]; then
        start_fio "$sc-$rep" 3600
        sleep "$RAMP"
    fi
    from=$(log_lines)
    start_r1 blank
    wait_log "$from" 'rebuilt replica=r1 state="in_sync"' 1800
    wall=$(sub "$(date +%s.%N)" "$R1_STARTED")
    if [[ $3 == 1 ]]; then stop_fio "$sc-$rep"; fi
    t0=$(log_time "$from" 'rebuilding from our base image replica=r1')
    t1=$(log_time "$from" 'rebuilt replica=r1')
    [[ -n $t0 && -n $t1 ]] || die "$sc: no 'rebuilding from our base image' / 'rebuilt' in the primary's log"
    read -r base_mib base_s < <(tail -n +"$((from + 1))" "$P_LOG" | grep -m1 'base image sent' \
        | sed -E 's/.*sent from byte [0-9]+ \(([0-9]+) MiB of data\) in ([0-9.]+) s.*/\1 \2/')
    ((base_mib > 0)) || die "$sc: the base image sent no data (log: $P_LOG)"
    [[ $(status 'r["state"]') == in_sync ]] || die "$sc: r1 is not in_sync after 'rebuilt'"
    if [[ $3 == 1 ]]; then read -r p50 p99 c99 n < <(lat_window "$sc-$rep" "$t0" "$t1"); fi
    s=$(sub "$t1" "$t0")
    row "$rep,$sc,$base_mib,$s,$(rate "$base_mib" "$s"),$2,$base_s,,$p50,$p99,$c99,$n,$wall"
}

catchup() { # scenario fio(0/1)
    local sc=$1 from t0 t1 s lag p50="" p99="" c99="" n="" wall
    [[ $(status 'r["state"]') == in_sync ]] || die "$sc: r1 is not in sync before the catch-up"
    stop r1
    nbdcopy --flush "$CATCHUP_IMAGE" "nbd://127.0.0.1:$NBD_P/" >>"$RUN_DIR/$sc.log" 2>&1 \
        || die "$sc: writing $CATCHUP_MIB MiB failed (log: $RUN_DIR/$sc.log)"
    if [[ $2 == 1 ]]; then
        start_fio "$sc-$rep" 3600
        sleep "$RAMP"
    fi
    lag=$(status "round(r['lag_bytes'] / 1048576, 1)")
    python3 -c "import sys; sys.exit(float(sys.argv[1]) < 0.99 * float(sys.argv[2]))" "$lag" "$CATCHUP_MIB" \
        || die "$sc: the primary counts a lag of $lag MiB for r1 after $CATCHUP_MIB MiB were written"
    from=$(log_lines)
    start_r1
    wait_log "$from" 'replica=r1 state="in_sync"' 600
    wall=$(sub "$(date +%s.%N)" "$R1_STARTED")
    if [[ $2 == 1 ]]; then stop_fio "$sc-$rep"; fi
    if tail -n +"$((from + 1))" "$P_LOG" | grep -qF 'rebuilding from our base image replica=r1'; then
        die "$sc: r1 was rebuilt, not caught up (WAL retention too small for CATCHUP_MIB?)"
    fi
    t0=$(log_time "$from" 'catching up from')
    t1=$(log_time "$from" 'caught up replica=r1')
    [[ -n $t0 && -n $t1 ]] || die "$sc: no 'catching up from' / 'caught up' in the primary's log"
    if [[ $2 == 1 ]]; then read -r p50 p99 c99 n < <(lat_window "$sc-$rep" "$t0" "$t1"); fi
    s=$(sub "$t1" "$t0")
    row "$rep,$sc,$lag,$s,$(rate "$lag" "$s"),,,$lag,$p50,$p99,$c99,$n,$wall"
}

sent_mib() { # the primary's blockrep_rebuild_sent_bytes_total, in MiB
    curl -sf "http://127.0.0.1:$ADMIN_P/v1/status" >/dev/null # the counters export on a report
    curl -sf "http://127.0.0.1:$ADMIN_P/metrics" | python3 -c '
import sys
for l in sys.stdin:
    if l.startswith("blockrep_rebuild_sent_bytes_total"):
        print(f"{float(l.split()[-1]) / 1048576:.1f}")
        break
else:
    print(0)'
}

# A blank r1 interrupted (SIGKILL) once its durable cursor passes half the data; then
# started again on a blank store (scratch) or on its own (resume). Rate limit: the primary's.
interrupted() { # scenario scratch|resume rate-mib
    local sc=$1 from t0 t1 s wall sent0 sent1 half=$((SIZE_BYTES / 2)) at=0
    stop r1
    start_r1 blank
    for _ in $(seq 1200); do
        at=$(curl -sf "http://127.0.0.1:$ADMIN_R1/v1/status" | python3 -c '
import json, sys
print(json.load(sys.stdin).get("rebuild_cursor_bytes") or 0)' 2>/dev/null || echo 0)
        ((at >= half)) && break
        alive "${PIDS[r1]}" || die "$sc: r1 exited (log: $RUN_DIR/r1.log)"
        sleep 0.05
    done
    ((at >= half)) || die "$sc: r1's rebuild cursor never passed 50% (at $at)"
    stop r1 KILL
    # The primary sees the session end before the restart is timed.
    for _ in $(seq 300); do
        [[ $(status 'r["state"]') != rebuilding ]] && break
        sleep 0.1
    done
    sent0=$(sent_mib)
    from=$(log_lines)
    if [[ $2 == scratch ]]; then
        start_r1 blank
    else
        start_r1
    fi
    wait_log "$from" 'rebuilt replica=r1 state="in_sync"' 1800
    wall=$(sub "$(date +%s.%N)" "$R1_STARTED")
    sent1=$(sent_mib)
    if [[ $2 == resume ]]; then
        tail -n +"$((from + 1))" "$P_LOG" | grep -qF 'resuming the rebuild from byte' \
            || die "$sc: the primary did not resume the rebuild (log: $P_LOG)"
    fi
    t0=$(log_time "$from" 'rebuilding from our base image replica=r1')
    t1=$(log_time "$from" 'rebuilt replica=r1')
    [[ -n $t0 && -n $t1 ]] || die "$sc: no 'rebuilding from our base image' / 'rebuilt' in the primary's log"
    s=$(sub "$t1" "$t0")
    local mib
    mib=$(sub "$sent1" "$sent0")
    row "$rep,$sc,$mib,$s,$(rate "$mib" "$s"),$3,,,,,,,$wall"
}

steady() {
    [[ $(status 'r["state"]') == in_sync ]] || die "steady: r1 is not in sync"
    local t0 t1 p50 p99 c99 n
    t0=$(python3 -c 'import time; print(time.time())')
    start_fio "steady-$rep" "$STEADY_S"
    wait "${PIDS[fio]}" || die "fio steady failed (see $RUN_DIR/steady-$rep.fio.err)"
    unset "PIDS[fio]"
    t1=$(python3 -c 'import time; print(time.time())')
    check_fio "steady-$rep"
    [[ $(status 'r["state"]') == in_sync ]] || die "steady: r1 left in_sync during the run"
    read -r p50 p99 c99 n < <(lat_window "steady-$rep" "$(python3 -c "print($t0 + $RAMP)")" "$t1")
    row "$rep,steady,,,,,,,$p50,$p99,$c99,$n,"
}

log "results: $CSV, $MD; data: $DATA_DIR; $REPS rep(s); SIZE_MIB=$SIZE_MIB CATCHUP_MIB=$CATCHUP_MIB"
for rep in $(seq "$REPS"); do
    log "rep $rep/$REPS: nbdcopy-file"
    nbdkit_file peer-src "$PEER_SRC" "$IMAGE" -r
    peer_copy nbdcopy-file "nbd://127.0.0.1:$PEER_SRC/"
    stop peer-src

    log "rep $rep/$REPS: primary with $SIZE_MIB MiB of random data"
    rm -rf "$DATA_DIR/p"
    "$BLOCKREP" create "$DATA_DIR/p" --size "${SIZE_MIB}MiB" --wal-size "$WAL_SIZE" >>"$P_LOG" 2>&1 \
        || die "blockrep create failed (log: $P_LOG)"
    start_primary 0
    nbdcopy --flush "$IMAGE" "nbd://127.0.0.1:$NBD_P/" >>"$P_LOG" 2>&1 || die "filling the primary failed"
    wait_wal_empty

    log "rep $rep/$REPS: nbdcopy-blockrep"
    peer_copy nbdcopy-blockrep "nbd://127.0.0.1:$NBD_P/"

    log "rep $rep/$REPS: rebuild-idle"
    rebuild rebuild-idle 0 0
    log "rep $rep/$REPS: steady (fio ${STEADY_S}s, r1 in sync)"
    steady
    log "rep $rep/$REPS: rebuild-fio"
    rebuild rebuild-fio 0 1
    log "rep $rep/$REPS: catchup-idle"
    catchup catchup-idle 0
    log "rep $rep/$REPS: catchup-fio"
    catchup catchup-fio 1

    limit=${REBUILD_RATE_MIB:-$(grep "^$rep,rebuild-idle," "$CSV" | cut -d, -f5 \
        | python3 -c 'import sys; print(max(1, round(float(sys.stdin.read()) / 2)))')}
    log "rep $rep/$REPS: rebuild-fio-limited (--rebuild-rate ${limit} MiB/s)"
    stop primary
    start_primary $((limit * 1024 * 1024))
    rebuild rebuild-fio-limited "$limit" 1
    log "rep $rep/$REPS: scratch-50 and resume-50 (--rebuild-rate ${INTERRUPT_RATE_MIB} MiB/s)"
    stop primary
    start_primary $((INTERRUPT_RATE_MIB * 1024 * 1024))
    interrupted scratch-50 scratch "$INTERRUPT_RATE_MIB"
    interrupted resume-50 resume "$INTERRUPT_RATE_MIB"
    stop r1
    stop primary
done

# ------------------------------------------------------------------ summary
python3 - "$CSV" "$MD" "$REPS" "$SIZE_MIB" "$CATCHUP_MIB" "$FIO_RATE" "$STEADY_S" "$DATA_DIR" "$BLOCKREP" \
    "${REBUILD_RATE_MIB:-50% of rebuild-idle}" <<'PY'
import csv, os, platform, statistics, subprocess, sys
(csv_path, md_path, reps, size, catchup, fio_rate, steady_s, data_dir, binary,
 limit) = sys.argv[1:]
rows = list(csv.DictReader(open(csv_path)))

def cmd(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"

def med(sc, k):
    xs = [float(r[k]) for r in rows if r["scenario"] == sc and r[k] not in ("", None)]
    return statistics.median(xs) if xs else None

def f(v, nd=1):
    return "–" if v is None else f"{v:,.{nd}f}".replace(",", " ")

dirty = cmd("sh", "-c", "git status --porcelain --untracked-files=no | head -1") not in ("", "?")
fs = cmd("sh", "-c", f"df -T {data_dir} | tail -1 | awk '{{print $1\" \"$2}}'")
out = [
    f"# Rebuild and catch-up benchmark {os.path.basename(md_path)[:-3]}",
    "",
    f"- method: bench/rebuild.sh (header); {reps} interleaved rep(s), medians; volume {size} MiB "
    f"of random data, catch-up {catchup} MiB; fio randwrite 4k QD8 --rate={fio_rate}; steady run "
    f"{steady_s} s; rate limit for rebuild-fio-limited: {limit}",
    f"- machine: {os.cpu_count()} cores, kernel {platform.release()}; data dir {data_dir} on {fs}",
    f"- tools: {cmd('fio', '--version')}, {cmd('nbdkit', '--version')}, {cmd('nbdcopy', '--version')}",
    f"- blockrep: {cmd('git', 'rev-parse', '--short', 'HEAD')}{' (dirty tree)' if dirty else ''}; "
    f"binary {binary} built {cmd('date', '-r', binary, '+%F %T')}",
    "",
    "| scenario | MiB | seconds | MiB/s | × nbdcopy-file | rate limit MiB/s | write lat p50 µs | lat p99 µs | p99 × steady | clat p99 µs | writes in window | per run MiB/s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]
peer = med("nbdcopy-file", "mib_s")
steady = med("steady", "lat_p99_us")
for sc in dict.fromkeys(r["scenario"] for r in rows):
    m, p99 = med(sc, "mib_s"), med(sc, "lat_p99_us")
    runs = ", ".join(r["mib_s"] for r in rows if r["scenario"] == sc and r["mib_s"])
    out.append("| " + " | ".join([
        sc, f(med(sc, "mib"), 0), f(med(sc, "seconds"), 2), f(m),
        f"{m / peer:.2f}" if m and peer else "–", f(med(sc, "rebuild_rate_mib_s"), 0),
        f(med(sc, "lat_p50_us"), 0), f(p99, 0),
        f"{p99 / steady:.2f}" if p99 and steady else "–", f(med(sc, "clat_p99_us"), 0),
        f(med(sc, "writes_in_window"), 0), runs or "–"]) + " |")
ri, rl = med("rebuild-idle", "mib_s"), med("rebuild-fio-limited", "lat_p99_us")
sc50, rs50 = med("scratch-50", "seconds"), med("resume-50", "seconds")
out += ["", "**Goals**", ""]
if sc50 and rs50:
    out.append(f"- time to in sync after an interruption at 50%: resumed {rs50:.2f} s, from "
               f"scratch {sc50:.2f} s ({rs50 / sc50:.2f} ×); sent again: "
               f"{f(med('resume-50', 'mib'))} MiB resumed, {f(med('scratch-50', 'mib'))} MiB from scratch")
if ri and peer:
    out.append(f"- rebuild (idle) ÷ nbdcopy loopback copy: {ri / peer:.2f} (goal ≥ 0.80: "
               f"{'met' if ri / peer >= 0.8 else 'NOT met'})")
if rl and steady:
    out.append(f"- write p99 during the rate-limited rebuild ÷ steady p99: {rl / steady:.2f} "
               f"(goal ≤ 2.0: {'met' if rl / steady <= 2 else 'NOT met'})")
out += ["", f"Per-run data: `{csv_path}`; fio JSON and server logs: `{csv_path[:-4]}/`.", ""]
text = "\n".join(out)
open(md_path, "w").write(text)
print(text)
PY
log "wrote $MD and $CSV"
