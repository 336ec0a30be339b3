#!/usr/bin/env bash
# How blockrep's costs grow with the volume, the WAL, the data and the connections (issue 17,
# goal 5). Four parts (PARTS, any subset, run in this order); in each, the cases are
# interleaved (rep 1 of every case, then rep 2, ...) and medians of REPS are reported:
#
#   rss       peak RSS (VmHWM) of `blockrep serve` under fio 4 KiB random writes at QD32 for
#             RSS_RUNTIME s across the whole of a sparse RSS_GIB volume (default WAL), next to
#             nbdkit-file over a sparse file of the same size with the same job: the IOPS of
#             both tell the disk's share of a slowdown on a large span from blockrep's
#   open      open time after a crash with a full WAL: a store with --wal-size W (OPEN_WALS) on
#             an OPEN_VOLUME_GIB volume, 1 MiB sequential writes at QD8 until the WAL is at least
#             OPEN_FULL_PCT% full (polled through /v1/status), then kill -9 of the server. The
#             store's files are synced and dropped from the page cache (posix_fadvise DONTNEED,
#             these files only), as after a reboot; then `blockrep inspect` is timed, the cache
#             is dropped again, and `blockrep serve` is timed until its NBD port answers
#             (nbdinfo, polled every 20 ms)
#   rebuild   rebuild time of a blank replica for REBUILD_GIB of data: a best-effort primary with
#             a volume of that size is filled through NBD (nbdcopy --flush from `nbdkit random`)
#             and its WAL emptied, then a blank replica (REPLICA_DIR) starts; time from the
#             primary's `rebuilding from our base image` log line to `rebuilt`, as in
#             bench/rebuild.sh (which copies a random image file, too much disk at 10 GiB)
#   cpu       CPU per write: user+sys of the server process (/proc/PID/stat, all threads) over
#             a CPU_RUNTIME s fio run of 4 KiB random writes at QD32 on each of CPU_CONNS
#             connections (fio --numjobs), ÷ the writes fio completed; blockrep on a 1 GiB
#             volume and nbdkit-file on a sparse 1 GiB file, one server per rep that takes the
#             connection counts in turn (order rotated across reps)
#
# Client and server share the machine's cores and one disk. Every store, file and replica is
# deleted after its case.
#
# Environment:
#   PARTS ("rss open rebuild cpu")  REPS (3)
#   RSS_GIB ("1 10 100")  RSS_RUNTIME (20)
#   OPEN_WALS ("64MiB 256MiB 1GiB")  OPEN_VOLUME_GIB (4)  OPEN_FULL_PCT (90)
#   REBUILD_GIB ("1 4 10"; a size the disk cannot take is skipped)  REPLICA_DIR (default: the data dir; a tmpfs such as /dev/shm/x when
#                          the disk cannot hold both copies of the largest size)
#   CPU_CONNS ("1 2 4")  CPU_RUNTIME (10)
#   BENCH_DATA_DIR (target/bench-data/cost-growth)  BENCH_RESULTS_DIR (target/bench-results)
#   PORT_BASE (13950)  BLOCKREP (target/release/blockrep)  BUILD (1; 0 = no cargo build)
#
#   SUMMARY ("")  CSV files of earlier runs: print and write the summary of their rows, run nothing
#
# Output: target/bench-results/cost-growth-<stamp>.csv (one row per part x case x rep), .md
# (medians and per-run values; also printed), server logs and fio JSON under cost-growth-<stamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

PARTS=${PARTS:-rss open rebuild cpu}
REPS=${REPS:-3}
RSS_GIB=${RSS_GIB:-1 10 100}
RSS_RUNTIME=${RSS_RUNTIME:-20}
OPEN_WALS=${OPEN_WALS:-64MiB 256MiB 1GiB}
OPEN_VOLUME_GIB=${OPEN_VOLUME_GIB:-4}
OPEN_FULL_PCT=${OPEN_FULL_PCT:-90}
REBUILD_GIB=${REBUILD_GIB:-1 4 10}
CPU_CONNS=${CPU_CONNS:-1 2 4}
CPU_RUNTIME=${CPU_RUNTIME:-10}
DATA_DIR=${BENCH_DATA_DIR:-$ROOT/target/bench-data/cost-growth}
REPLICA_DIR=${REPLICA_DIR:-$DATA_DIR}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$ROOT/target/bench-results}
PORT_BASE=${PORT_BASE:-13950}
BUILD=${BUILD:-1}
BLOCKREP=${BLOCKREP:-${CARGO_TARGET_DIR:-$ROOT/target}/release/blockrep}
export NO_COLOR=1 # plain server logs: the timestamps are parsed

NBD_P=$PORT_BASE
ADMIN_P=$((PORT_BASE + 1))
REPL_R1=$((PORT_BASE + 2))
ADMIN_R1=$((PORT_BASE + 3))
SRC_P=$((PORT_BASE + 4))

die() {
    echo "cost-growth: error: $*" >&2
    exit 1
}
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

for tool in fio nbdkit nbdcopy nbdinfo python3 setsid ss curl; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install fio nbdkit libnbd-bin curl)"
done
for p in $PARTS; do
    case $p in rss | open | rebuild | cpu) ;; *) die "unknown part $p" ;; esac
done
if [[ -z ${SUMMARY:-} ]]; then
    for p in $(seq "$PORT_BASE" $((PORT_BASE + 4))); do
        [[ -z $(ss -Htln "sport = :$p") ]] || die "port $p is already in use; set PORT_BASE"
    done
fi

STAMP=$(date +%Y%m%d-%H%M%S)
SUMMARY=${SUMMARY:-}
if [[ -n $SUMMARY ]]; then
    PARTS="" # the summary below reads these rows instead
fi
RUN_DIR=$RESULTS_DIR/cost-growth-$STAMP
CSV=$RESULTS_DIR/cost-growth-$STAMP.csv
MD=$RESULTS_DIR/cost-growth-$STAMP.md
mkdir -p "$DATA_DIR" "$REPLICA_DIR" "$RUN_DIR"
STORE=$DATA_DIR/store
FILE=$DATA_DIR/file.img
R1=$REPLICA_DIR/r1

# ------------------------------------------------------------------ processes we started
declare -A PIDS=()
alive() { # pid: running and not a zombie
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
scrub() { [[ -n ${SUMMARY:-} ]] || rm -rf "$STORE" "$FILE" "$R1"; }
cleanup() {
    local n
    for n in "${!PIDS[@]}"; do stop "$n"; done
    scrub
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $BUILD == 1 && -z $SUMMARY ]]; then
    log "cargo build --release --bin blockrep"
    cargo build --release --bin blockrep >&2
fi
[[ -x $BLOCKREP ]] || die "$BLOCKREP missing (cargo build --release)"

# ------------------------------------------------------------------ helpers
wait_nbd() { # port name
    for _ in $(seq 1500); do
        nbdinfo --size "nbd://127.0.0.1:$1/" >/dev/null 2>&1 && return 0
        alive "${PIDS[$2]}" || break
        sleep 0.02
    done
    die "$2 did not come up on port $1 (log: $RUN_DIR/$2.log)"
}
serve() { # name store [serve args...]: blockrep serve on NBD_P / ADMIN_P
    local name=$1 dir=$2
    shift 2
    echo "=== $name" >>"$RUN_DIR/$name.log"
    setsid "$BLOCKREP" serve "$dir" --nbd "127.0.0.1:$NBD_P" --metrics "127.0.0.1:$ADMIN_P" "$@" \
        </dev/null >>"$RUN_DIR/$name.log" 2>&1 &
    PIDS[$name]=$!
}
nbdkit_file() { # name file
    echo "=== $1" >>"$RUN_DIR/$1.log"
    setsid nbdkit -f -p "$NBD_P" -i 127.0.0.1 file "$2" </dev/null >>"$RUN_DIR/$1.log" 2>&1 &
    PIDS[$1]=$!
    wait_nbd "$NBD_P" "$1"
}
status() { # python expression over the primary's /v1/status JSON `s`
    curl -sf "http://127.0.0.1:$ADMIN_P/v1/status" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(eval(sys.argv[1]))' "$1"
}
wait_wal_empty() {
    for _ in $(seq 1200); do
        [[ $(status 's["wal_used_bytes"]' 2>/dev/null) == 0 ]] && return 0
        sleep 0.1
    done
    die "the WAL did not empty in 120 s"
}
# After a load: blockrep gets SIGKILL, since a clean stop would first checkpoint the whole WAL
# (over a minute of random writes into a sparse file on a busy disk) and the store is deleted
# next anyway.
stop_load_server() { # name server
    if [[ $2 == blockrep ]]; then stop "$1" KILL 2>/dev/null; else stop "$1"; fi
}
free_gib() { df -P -k "$1" | awk 'NR == 2 {print int($4 / 1048576)}'; }
# Refuses a case the data dir's free space cannot take (other work shares the disk).
need_space() { # GiB dir
    local free
    free=$(free_gib "$2")
    ((free >= $1)) || die "$2 has $free GiB free, this case needs $1 GiB"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
now() { date +%s.%N; }
sub() { python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.3f}')" "$@"; }
# fio against NBD_P; prints "iops total_writes" from its JSON.
fio_randwrite() { # tag size-bytes runtime-s jobs ramp-s
    local json=$RUN_DIR/$1.json
    fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_P/" --rw=randwrite --bs=4k \
        --iodepth=32 --numjobs="$4" --group_reporting --size="$2" --time_based \
        --runtime="$3" --ramp_time="$5" --norandommap --randrepeat=0 --output-format=json \
        >"$json" 2>"$RUN_DIR/$1.err" || die "fio $1 failed (see $RUN_DIR/$1.err)"
    python3 - "$json" <<'PY' || die "fio $1: bad report ($json)"
import json, sys
t = open(sys.argv[1]).read()
job = json.loads(t[t.index("{"):])["jobs"][0]
if job.get("error") or not job["write"]["total_ios"]:
    raise SystemExit(f"fio job error {job.get('error')}")
print(f"{job['write']['iops']:.0f} {job['write']['total_ios']}")
PY
}
# Writes back and drops one store's files from the page cache (only these files).
drop_cache() { # dir
    python3 - "$1" <<'PY'
import os, sys
for name in os.listdir(sys.argv[1]):
    path = os.path.join(sys.argv[1], name)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
PY
}

echo "part,case,server,rep,value,unit,iops,extra" >"$CSV"
for f in $SUMMARY; do tail -n +2 "$f" >>"$CSV"; done
row() { echo "$*" >>"$CSV"; log "  $*"; }

# ------------------------------------------------------------------ parts
rss_case() { # GiB server
    local gib=$1 srv=$2 bytes=$(($1 << 30)) pid out
    scrub
    need_space 5 "$DATA_DIR" # 20 s of random writes allocate a few GiB of the sparse file
    if [[ $srv == blockrep ]]; then
        "$BLOCKREP" create "$STORE" --size "${gib}GiB" >>"$RUN_DIR/rss.log" 2>&1 \
            || die "blockrep create failed"
        serve rss "$STORE"
        wait_nbd "$NBD_P" rss
        pid=${PIDS[rss]}
    else
        truncate -s "$bytes" "$FILE"
        nbdkit_file rss "$FILE"
        pid=${PIDS[rss]}
    fi
    out=$(fio_randwrite "rss-$srv-${gib}G-$rep" "$bytes" "$RSS_RUNTIME" 1 1)
    local hwm
    hwm=$(hwm_kib "$pid")
    stop_load_server rss "$srv"
    row "rss,${gib}GiB,$srv,$rep,$((hwm / 1024)),MiB,${out% *},"
    scrub
}

open_case() { # wal-size
    local wal=$1 cap used=0 pct=0 t0 t1 t2 inspect_s open_s entries
    scrub
    "$BLOCKREP" create "$STORE" --size "${OPEN_VOLUME_GIB}GiB" --wal-size "$wal" \
        >>"$RUN_DIR/open.log" 2>&1 || die "blockrep create failed"
    serve open "$STORE"
    wait_nbd "$NBD_P" open
    cap=$(status 's["wal_capacity_bytes"]')
    fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_P/" --rw=write --bs=1M \
        --iodepth=8 --size=$((OPEN_VOLUME_GIB << 30)) --time_based --runtime=120 \
        --output-format=json >"$RUN_DIR/open-fill-$wal-$rep.json" 2>&1 &
    PIDS[fill]=$!
    for _ in $(seq 6000); do
        used=$(status 's["wal_used_bytes"]' 2>/dev/null || echo 0)
        pct=$((used * 100 / cap))
        ((pct >= OPEN_FULL_PCT)) && break
        alive "${PIDS[fill]}" || die "open: fio ended before the WAL filled"
        sleep 0.01
    done
    ((pct >= OPEN_FULL_PCT)) || die "open: the $wal WAL never reached $OPEN_FULL_PCT% (at $pct%)"
    stop open KILL 2>/dev/null
    stop fill KILL 2>/dev/null
    drop_cache "$STORE"
    t0=$(now)
    "$BLOCKREP" inspect --json "$STORE" >"$RUN_DIR/open-inspect-$wal-$rep.json" 2>>"$RUN_DIR/open.log" \
        || die "blockrep inspect failed after the crash"
    t1=$(now)
    inspect_s=$(sub "$t1" "$t0")
    entries=$(python3 -c 'import json, sys; d = json.load(open(sys.argv[1]))
print("%dMiB/%d" % (d["wal_used"] >> 20, d["wal_entries"]))' "$RUN_DIR/open-inspect-$wal-$rep.json")
    drop_cache "$STORE"
    t1=$(now)
    serve open "$STORE"
    wait_nbd "$NBD_P" open
    t2=$(now)
    open_s=$(sub "$t2" "$t1")
    local hwm
    hwm=$(hwm_kib "${PIDS[open]}")
    stop open
    row "open,$wal,blockrep,$rep,$open_s,s,,inspect_s=$inspect_s;wal_at_kill=${pct}%;wal_used/entries=$entries;rss_after_open_mib=$((hwm / 1024))"
    scrub
}

log_time() { # log from-line pattern: epoch seconds of the first line with pattern after from-line
    tail -n +"$(($2 + 1))" "$1" | grep -F -m1 -- "$3" | python3 -c '
import sys, datetime
line = sys.stdin.readline()
if not line:
    sys.exit(0)
ts = line.split()[0].rstrip("Z")
print(datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp())'
}

rebuild_case() { # GiB
    local gib=$1 bytes=$(($1 << 30)) plog=$RUN_DIR/rebuild-primary.log from t0 t1 wall start
    scrub
    # Both copies, their WALs and room for everything else on the disk: a size that does not
    # fit is skipped (a row without a value), not forced.
    local need_d=$((gib + 4)) need_r=$((gib + 1))
    if [[ $(df -P "$DATA_DIR" | awk 'NR == 2 {print $1}') == $(df -P "$REPLICA_DIR" | awk 'NR == 2 {print $1}') ]]; then
        need_d=$((2 * gib + 4))
    fi
    if (($(free_gib "$DATA_DIR") < need_d || $(free_gib "$REPLICA_DIR") < need_r)); then
        row "rebuild,${gib}GiB,blockrep,$rep,,s,,skipped=$(free_gib "$DATA_DIR") GiB free in the data dir (needs $need_d)"
        return 0
    fi
    "$BLOCKREP" create "$STORE" --size "${gib}GiB" >>"$plog" 2>&1 || die "blockrep create failed"
    serve rebuild-primary "$STORE" --replica "r1=127.0.0.1:$REPL_R1" --commit best-effort
    wait_nbd "$NBD_P" rebuild-primary
    setsid nbdkit -f -r -p "$SRC_P" -i 127.0.0.1 random "$bytes" seed="$rep" \
        </dev/null >>"$RUN_DIR/rebuild-src.log" 2>&1 &
    PIDS[src]=$!
    wait_nbd "$SRC_P" src
    nbdcopy --flush "nbd://127.0.0.1:$SRC_P/" "nbd://127.0.0.1:$NBD_P/" >>"$plog" 2>&1 \
        || die "filling the primary failed"
    stop src
    wait_wal_empty
    "$BLOCKREP" create "$R1" --size "${gib}GiB" >>"$RUN_DIR/rebuild-r1.log" 2>&1 \
        || die "blockrep create r1 failed"
    from=$(wc -l <"$plog")
    start=$(now)
    setsid "$BLOCKREP" replica "$R1" --listen "127.0.0.1:$REPL_R1" --metrics "127.0.0.1:$ADMIN_R1" \
        </dev/null >>"$RUN_DIR/rebuild-r1.log" 2>&1 &
    PIDS[r1]=$!
    for _ in $(seq 18000); do
        tail -n +"$((from + 1))" "$plog" | grep -qF 'rebuilt replica=r1 state="in_sync"' && break
        alive "${PIDS[r1]}" || die "r1 exited (log: $RUN_DIR/rebuild-r1.log)"
        alive "${PIDS[rebuild-primary]}" || die "the primary exited (log: $plog)"
        sleep 0.1
    done
    wall=$(sub "$(now)" "$start")
    t0=$(log_time "$plog" "$from" 'rebuilding from our base image replica=r1')
    t1=$(log_time "$plog" "$from" 'rebuilt replica=r1')
    [[ -n $t0 && -n $t1 ]] || die "rebuild ${gib}GiB: no 'rebuilding' / 'rebuilt' in $plog"
    local r1_cpu
    r1_cpu=$(python3 -c "print(f'{$(cpu_ticks "${PIDS[r1]}") / $(getconf CLK_TCK):.2f}')")
    stop r1
    stop rebuild-primary
    row "rebuild,${gib}GiB,blockrep,$rep,$(sub "$t1" "$t0"),s,,wall_s=$wall;r1_cpu_s=$r1_cpu"
    scrub
}

# One server per rep, one fio run per connection count against it; the counts' order rotates
# across reps (1 2 4, 2 4 1, 4 1 2), so that no count always meets the youngest volume. One
# store per rep rather than per run: deleting a fragmented file on this ext4 (mounted with
# `discard`) takes a minute, and the runs in between would wait for it.
cpu_server() { # server conns...
    local srv=$1 pid c0 c1 out us conns
    shift
    scrub
    if [[ $srv == blockrep ]]; then
        "$BLOCKREP" create "$STORE" --size 1GiB >>"$RUN_DIR/cpu.log" 2>&1 || die "blockrep create failed"
        serve cpu "$STORE"
        wait_nbd "$NBD_P" cpu
    else
        truncate -s $((1 << 30)) "$FILE"
        nbdkit_file cpu "$FILE"
    fi
    pid=${PIDS[cpu]}
    for conns in "$@"; do
        c0=$(cpu_ticks "$pid")
        out=$(fio_randwrite "cpu-$srv-$conns-$rep" $((1 << 30)) "$CPU_RUNTIME" "$conns" 0)
        c1=$(cpu_ticks "$pid")
        us=$(python3 -c "print(f'{($c1 - $c0) / $(getconf CLK_TCK) * 1e6 / ${out#* }:.2f}')")
        row "cpu,${conns}conn,$srv,$rep,$us,us/write,${out% *},cpu_ticks=$((c1 - c0))"
    done
    stop_load_server cpu "$srv"
    scrub
}

log "results: $CSV, $MD; data: $DATA_DIR (replica: $REPLICA_DIR); parts: $PARTS; $REPS rep(s)"
for part in $PARTS; do
    for rep in $(seq "$REPS"); do
        case $part in
        rss)
            for g in $RSS_GIB; do
                for s in blockrep nbdkit-file; do
                    log "rss rep $rep/$REPS: $s, ${g} GiB"
                    rss_case "$g" "$s"
                done
            done
            ;;
        open)
            for w in $OPEN_WALS; do
                log "open rep $rep/$REPS: WAL $w"
                open_case "$w"
            done
            ;;
        rebuild)
            for g in $REBUILD_GIB; do
                log "rebuild rep $rep/$REPS: ${g} GiB"
                rebuild_case "$g"
            done
            ;;
        cpu)
            read -r -a conns <<<"$CPU_CONNS"
            k=$(((rep - 1) % ${#conns[@]}))
            order=("${conns[@]:k}" "${conns[@]:0:k}")
            for s in blockrep nbdkit-file; do
                log "cpu rep $rep/$REPS: $s, ${order[*]} connection(s)"
                cpu_server "$s" "${order[@]}"
            done
            ;;
        esac
    done
done

# ------------------------------------------------------------------ summary
python3 - "$CSV" "$MD" "$REPS" "$DATA_DIR" "$REPLICA_DIR" "$BLOCKREP" "$RSS_RUNTIME" "$CPU_RUNTIME" <<'PY'
import csv, os, platform, statistics, subprocess, sys
csv_path, md_path, reps, data_dir, replica_dir, binary, rss_rt, cpu_rt = sys.argv[1:]
rows = list(csv.DictReader(open(csv_path)))

def cmd(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"

def med(xs):
    xs = [float(x) for x in xs if x not in ("", None)]
    return statistics.median(xs) if xs else None

def f(v, nd=0):
    return "–" if v is None else f"{v:,.{nd}f}".replace(",", " ")

def extra(r, key):
    for kv in r["extra"].split(";"):
        if kv.startswith(key + "="):
            return kv.split("=", 1)[1]
    return ""

def pick(part, case, server):
    return [r for r in rows if r["part"] == part and r["case"] == case and r["server"] == server]

dirty = cmd("sh", "-c", "git status --porcelain --untracked-files=no | head -1") not in ("", "?")
fs = cmd("sh", "-c", f"df -T {data_dir} | tail -1 | awk '{{print $1\" \"$2}}'")
out = [
    f"# Cost growth {os.path.basename(md_path)[:-3]}",
    "",
    f"- method: bench/cost-growth.sh (header); {reps} interleaved rep(s), medians",
    f"- machine: {os.cpu_count()} cores, kernel {platform.release()}; data dir {data_dir} on {fs}; "
    f"replica dir {replica_dir}",
    f"- blockrep: {cmd('git', 'rev-parse', '--short', 'HEAD')}{' (dirty tree)' if dirty else ''}; "
    f"binary {binary} built {cmd('date', '-r', binary, '+%F %T')}",
    "",
]
cases = lambda part: list(dict.fromkeys(r["case"] for r in rows if r["part"] == part))
if cases("rss"):
    out += [f"## Peak RSS under 4 KiB random writes, QD32, {rss_rt} s across the volume", "",
            "| volume | blockrep peak RSS MiB | blockrep IOPS | nbdkit-file IOPS | blockrep ÷ nbdkit-file | nbdkit-file peak RSS MiB | per run RSS / IOPS (blockrep) | per run IOPS (nbdkit-file) |",
            "|---|---|---|---|---|---|---|---|"]
    for c in cases("rss"):
        b, n = pick("rss", c, "blockrep"), pick("rss", c, "nbdkit-file")
        bi, ni = med(r["iops"] for r in b), med(r["iops"] for r in n)
        out.append("| " + " | ".join([
            c, f(med(r["value"] for r in b)), f(bi), f(ni),
            f"{bi / ni:.2f}" if bi and ni else "–", f(med(r["value"] for r in n)),
            ", ".join(f"{r['value']} / {r['iops']}" for r in b),
            ", ".join(r["iops"] for r in n)]) + " |")
    out.append("")
if cases("open"):
    out += ["## Open after kill -9 with a full WAL (files dropped from the page cache)", "",
            "| WAL | serve until NBD answers, s | inspect, s | WAL at kill | WAL used / entries (inspect) | RSS after open MiB | per run serve s / inspect s |",
            "|---|---|---|---|---|---|---|"]
    for c in cases("open"):
        rs = pick("open", c, "blockrep")
        out.append("| " + " | ".join([
            c, f(med(r["value"] for r in rs), 2), f(med(extra(r, "inspect_s") for r in rs), 2),
            ", ".join(extra(r, "wal_at_kill") for r in rs),
            ", ".join(extra(r, "wal_used/entries") for r in rs),
            f(med(extra(r, "rss_after_open_mib") for r in rs)),
            ", ".join(f"{r['value']} / {extra(r, 'inspect_s')}" for r in rs)]) + " |")
    out.append("")
if cases("rebuild"):
    out += ["## Rebuild of a blank replica", "",
            "| data | seconds (primary's log) | MiB/s | wall s | replica CPU s | per run s |",
            "|---|---|---|---|---|---|"]
    for c in cases("rebuild"):
        rs = pick("rebuild", c, "blockrep")
        s = med(r["value"] for r in rs)
        mib = float(c[:-3]) * 1024
        out.append("| " + " | ".join([
            c, f(s, 2), f(mib / s) if s else "–", f(med(extra(r, "wall_s") for r in rs), 2),
            f(med(extra(r, "r1_cpu_s") for r in rs), 2), ", ".join(r["value"] for r in rs)]) + " |")
    out.append("")
if cases("cpu"):
    out += [f"## CPU per write, 4 KiB random writes at QD32 per connection, {cpu_rt} s", "",
            "| connections | blockrep µs/write | blockrep IOPS | nbdkit-file µs/write | nbdkit-file IOPS | per run µs (blockrep / nbdkit-file) |",
            "|---|---|---|---|---|---|"]
    for c in cases("cpu"):
        b, n = pick("cpu", c, "blockrep"), pick("cpu", c, "nbdkit-file")
        out.append("| " + " | ".join([
            c, f(med(r["value"] for r in b), 1), f(med(r["iops"] for r in b)),
            f(med(r["value"] for r in n), 1), f(med(r["iops"] for r in n)),
            ", ".join(r["value"] for r in b) + " / " + ", ".join(r["value"] for r in n)]) + " |")
    out.append("")
out += [f"Per-run data: `{csv_path}`; logs and fio JSON: `{csv_path[:-4]}/`.", ""]
text = "\n".join(out)
open(md_path, "w").write(text)
print(text)
PY
log "wrote $MD and $CSV"
