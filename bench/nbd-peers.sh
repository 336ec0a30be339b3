#!/usr/bin/env bash
# Side-by-side NBD benchmark: blockrep against the peer servers, with the method of
# shared/design/nbd.md §6 so the numbers compare with the ones there.
#
#   bench/nbd-peers.sh                        full run: 3 reps x 10 s x 4 workloads x 5 servers
#   REPS=1 RUNTIME=2 WORKLOADS="randwrite4k fsyncwrite4k" bench/nbd-peers.sh    smoke run
#
# Method: one 1 GiB export per server, pre-filled with the same random image (so reads read
# real data); fio --ioengine=nbd, one job (one connection; multiconn4: four), --time_based --runtime=R
# --ramp_time=1 --norandommap --randrepeat=0; repetitions interleaved across servers (rep 1
# of every server, then rep 2, ...); medians reported. Every server starts fresh for each
# rep (new copy of the image / new blockrep store / new RAM disk), and every on-disk backing
# lives in the same directory, so they share one disk. Client and servers share the machine's
# cores: these are "protocol + stack" numbers, not disk numbers.
#
# Workloads (WORKLOADS, any subset, in this order):
#   randwrite4k   --rw=randwrite --bs=4k --iodepth=32
#   randread4k    --rw=randread  --bs=4k --iodepth=32
#   seqwrite1m    --rw=write     --bs=1M --iodepth=8
#   fsyncwrite4k  --rw=randwrite --bs=4k --iodepth=1 --fsync=1  (WRITE + FLUSH per I/O)
#   fsyncwrite4k-qd32  the same at --iodepth=32: up to 32 writes in flight, a FLUSH after every
#                 write; the server can commit many of them with one sync (group commit)
#   multiconn4    --rw=randwrite --bs=4k --iodepth=32 --numjobs=4 --group_reporting: four NBD
#                 connections to the one export at once, QD32 each (blockrep and nbdkit-file
#                 both advertise NBD_FLAG_CAN_MULTI_CONN); the figure is the sum of the four
#
# Histories (HISTORY, one per run):
#   fresh (default)  file-backed servers (nbdkit-file, qemu-*) serve a fresh `cp` of the image,
#                 written back before the server starts: their best case, nothing dirty
#   filled        file-backed servers start on an empty sparse file that is filled through NBD
#                 (`nbdcopy --flush IMAGE`) and synced before the run: what a user's disk looks
#                 like after a large copy. blockrep and nbdkit-mem are filled through NBD in both
#                 histories (blockrep then waits until its checkpoint has emptied the WAL)
#   empty         every server starts on an empty sparse volume and nothing fills it: each
#                 block a write reaches is written for the first time (a new volume under
#                 mkfs or a database's first load). Write workloads only (reads would read
#                 holes)
#
# Servers (SERVERS, any subset):
#   blockrep           target/release/blockrep create + serve --nbd 127.0.0.1:PORT
#   nbdkit-file        nbdkit file IMG
#   qemu-wb-threads    qemu-nbd -f raw --cache=writeback --aio=threads -t --shared=8 IMG
#   qemu-wb-iouring    qemu-nbd -f raw --cache=writeback --aio=io_uring -t --shared=8 IMG (not
#                      in the default set; nbd.md §6 has it)
#   qemu-none-iouring  qemu-nbd -f raw --cache=none --aio=io_uring -t --shared=8 IMG
#   nbdkit-mem         nbdkit memory 1G
#   disk-direct        no server: fio --ioengine=io_uring --direct=1 on a fully written copy of the
#                      image in the same directory (what the disk itself takes; issue 17 compares
#                      1 MiB sequential writes with it). Not written back at a FLUSH-free
#                      workload's end, like every server here; --fsync works as for the others
#   blockrep-base      like blockrep, with the binary $BLOCKREP_BASE (e.g. a release build of
#                      the commit before a change): an A/B of two builds in one interleaved run
#   blockrep-tls       like blockrep, with --tls require --tls-certificates CERTS
#   nbdkit-file-tls    nbdkit --tls=require --tls-certificates=CERTS file IMG
#                      (both TLS servers use the same certificates, made once per run with
#                      `blockrep certs`; fio's nbd engine may not read certificate files named
#                      in its URI, so it runs as `nobody` with HOME holding .pki/libnbd/ca-cert.pem,
#                      libnbd's default place for a non-root user)
#
#   TLS cost:  SERVERS="blockrep blockrep-tls nbdkit-file nbdkit-file-tls" \
#              REFS="blockrep nbdkit-file-tls" bench/nbd-peers.sh
#
# Environment:
#   REPS (3)  RUNTIME (10 s)  RAMP (1 s)  SETTLE (2 s pause after pre-fill, before fio;
#             blockrep first waits until its checkpoint has moved the pre-fill out of the WAL)
#   WORKLOADS, SERVERS (as above)
#   SIZE_MIB (1024)           export size
#   BENCH_DATA_DIR            backing files, blockrep store, random image
#                             (default: target/bench-data in the repo; must be one disk)
#   BENCH_RESULTS_DIR         default target/bench-results
#   PORT_BASE (10950)         servers listen on 127.0.0.1:PORT_BASE+i
#   BLOCKREP_CREATE_ARGS      extra args for `blockrep create` (e.g. "--wal-size 512MiB")
#   BLOCKREP_SERVE_ARGS       extra args for `blockrep serve` (e.g. "--io-engine plain")
#   BUILD (1)                 0 = do not run cargo build --release first
#   BLOCKREP_BASE             the binary the blockrep-base server runs
#   BLOCKREP_BIN              the binary the blockrep servers run (default target/release/blockrep)
#   REFS ("nbdkit-file nbdkit-mem")  the servers every row is also given as a ratio to
#   CPU (0)                   1 = also sample the server process's CPU (bench/cpu-split.py)
#                             over the run's middle (from RAMP+1 s, for RUNTIME-2 s) and report
#                             CPU µs per I/O (per 1 MiB write for seqwrite1m; disk-direct has
#                             no server, so only fio's own is given there)
#
# Output: target/bench-results/<timestamp>.csv (one row per server x workload x rep),
# <timestamp>.md (medians, ratios to the REFS servers; also printed), and the raw
# fio JSON and server logs under <timestamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
SETTLE=${SETTLE:-2}
SIZE_MIB=${SIZE_MIB:-1024}
WORKLOADS=${WORKLOADS:-randwrite4k randread4k seqwrite1m fsyncwrite4k}
HISTORY=${HISTORY:-fresh}
SERVERS=${SERVERS:-blockrep nbdkit-file qemu-wb-threads qemu-none-iouring nbdkit-mem}
REFS=${REFS:-nbdkit-file nbdkit-mem}
DATA_DIR=${BENCH_DATA_DIR:-$ROOT/target/bench-data}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$ROOT/target/bench-results}
PORT_BASE=${PORT_BASE:-10950}
BUILD=${BUILD:-1}
CPU=${CPU:-0}
read -r -a BLOCKREP_CREATE_ARGS <<<"${BLOCKREP_CREATE_ARGS:-}"
read -r -a BLOCKREP_SERVE_ARGS <<<"${BLOCKREP_SERVE_ARGS:-}"
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
BLOCKREP=${BLOCKREP_BIN:-$ROOT/target/release/blockrep}
export NO_COLOR=1 # plain server logs

die() {
    echo "nbd-peers: error: $*" >&2
    exit 1
}
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

for tool in fio nbdkit qemu-nbd nbdcopy nbdinfo python3 setsid ss; do
    command -v "$tool" >/dev/null \
        || die "$tool not found (apt-get install fio nbdkit qemu-utils libnbd-bin)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
for w in $WORKLOADS; do
    case $w in randwrite4k | randread4k | seqwrite1m | fsyncwrite4k | fsyncwrite4k-qd32 | multiconn4) ;;
    *) die "unknown workload $w" ;;
    esac
done
case $HISTORY in fresh | filled | empty) ;; *) die "unknown HISTORY $HISTORY (fresh, filled or empty)" ;; esac
if [[ $HISTORY == empty ]]; then
    for w in $WORKLOADS; do
        [[ $w == randread4k ]] && die "HISTORY=empty has nothing to read: drop randread4k"
    done
    for s in $SERVERS; do
        case $s in blockrep | blockrep-base | nbdkit-file | qemu-*) ;;
        *) die "HISTORY=empty is for blockrep, blockrep-base, nbdkit-file and qemu-* (not $s)" ;;
        esac
    done
fi
i=0
declare -A PORT
for s in $SERVERS; do
    case $s in blockrep | blockrep-base | blockrep-tls | nbdkit-file | nbdkit-file-tls | qemu-wb-threads | qemu-wb-iouring | qemu-none-iouring | nbdkit-mem | disk-direct) ;;
    *) die "unknown server $s" ;;
    esac
    PORT[$s]=$((PORT_BASE + i))
    i=$((i + 1))
done
for s in $SERVERS; do
    if [[ -n $(ss -Htln "sport = :${PORT[$s]}") ]]; then
        die "port ${PORT[$s]} (for $s) is already in use; set PORT_BASE"
    fi
done

STAMP=$(date +%Y%m%d-%H%M%S)
RUN_DIR=$RESULTS_DIR/$STAMP
PID_DIR=$RUN_DIR/pids
mkdir -p "$DATA_DIR" "$RUN_DIR" "$PID_DIR"
CSV=$RESULTS_DIR/$STAMP.csv
MD=$RESULTS_DIR/$STAMP.md

# Stop whatever we started (only our pid files), on any exit.
stop_pidfile() {
    local f=$1 pid
    [[ -s $f ]] || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ($f) ignored SIGTERM for 30 s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$f"
}
cleanup() {
    local f
    for f in "$PID_DIR"/*.pid; do
        [[ -e $f ]] && stop_pidfile "$f"
    done
    # Per-run scratch (the random image is kept and reused).
    rm -f "$DATA_DIR/work.img"
    rm -rf "$DATA_DIR/blockrep-store"
    rmdir "$PID_DIR" 2>/dev/null
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $BUILD == 1 ]]; then
    log "cargo build --release --bin blockrep"
    cargo build --release --bin blockrep >&2
fi
[[ -x $BLOCKREP ]] || die "$BLOCKREP missing (cargo build --release)"

# The random image every export starts from.
IMAGE=$DATA_DIR/random-${SIZE_MIB}M.img
if [[ ! -f $IMAGE || $(stat -c %s "$IMAGE") -ne $SIZE_BYTES ]]; then
    log "writing $IMAGE ($SIZE_MIB MiB of random data)"
    head -c "$SIZE_BYTES" /dev/urandom >"$IMAGE.tmp"
    mv "$IMAGE.tmp" "$IMAGE"
fi
WORK_IMG=$DATA_DIR/work.img
STORE=$DATA_DIR/blockrep-store

# Certificates for the TLS servers: one CA, a server certificate (answers as 127.0.0.1), and a
# client directory in the layout libnbd's tls-certificates= reads. Made fresh for each run.
CERTS=$RUN_DIR/certs
if [[ " $SERVERS " == *-tls\ * ]]; then
    "$BLOCKREP" certs init "$CERTS/ca" >/dev/null
    "$BLOCKREP" certs issue "$CERTS/ca" --server bench --out "$CERTS/server" >/dev/null
    "$BLOCKREP" certs issue "$CERTS/ca" --client bench --out "$CERTS/client" >/dev/null
    FIO_HOME=$CERTS/fio-home
    mkdir -p "$FIO_HOME/.pki/libnbd"
    cp "$CERTS/ca/ca-cert.pem" "$FIO_HOME/.pki/libnbd/"
    chmod a+rx "$CERTS" "$FIO_HOME" "$FIO_HOME/.pki" "$FIO_HOME/.pki/libnbd"
    chmod a+r "$FIO_HOME/.pki/libnbd/ca-cert.pem"
fi

uri() { # server
    case $1 in
    *-tls) echo "nbds://127.0.0.1:${PORT[$1]}/?tls-certificates=$CERTS/client" ;;
    *) echo "nbd://127.0.0.1:${PORT[$1]}/" ;;
    esac
}

# fio's URI and the command prefix that runs it (see the TLS servers above).
fio_uri() { # server
    case $1 in
    *-tls) echo "nbds://127.0.0.1:${PORT[$1]}/" ;;
    *) uri "$1" ;;
    esac
}
fio_runner() { # server
    case $1 in
    *-tls) echo "setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=$FIO_HOME" ;;
    esac
}

wait_ready() { # port pid-file name
    local uri
    uri=$(uri "$3")
    for _ in $(seq 300); do
        if nbdinfo --size "$uri" >/dev/null 2>&1; then
            return 0
        fi
        if [[ -s $2 ]] && ! kill -0 "$(cat "$2")" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    die "$3 did not come up on port $1 (log: $RUN_DIR/$3.log)"
}

# Starts one fresh server with the random image; records its pid in $PID_DIR/<name>.pid.
start_server() { # name rep
    local name=$1 rep=$2 port=${PORT[$1]} pidf=$PID_DIR/$1.pid logf=$RUN_DIR/$1.log
    local img_args=()
    case $name in
    disk-direct)
        # Fully written (unwritten extents would slow O_DIRECT writes down), written back.
        cp --sparse=never "$IMAGE" "$WORK_IMG"
        sync -f "$WORK_IMG" 2>/dev/null || sync
        sleep "$SETTLE"
        return
        ;;
    nbdkit-file | nbdkit-file-tls | qemu-*)
        if [[ $HISTORY == fresh ]]; then
            # A fresh copy of the image on the shared disk, written back before the server
            # starts.
            cp --sparse=never "$IMAGE" "$WORK_IMG"
            sync -f "$WORK_IMG" 2>/dev/null || sync
        else
            # Empty and sparse: filled through NBD once the server is up (below).
            rm -f "$WORK_IMG"
            truncate -s "$SIZE_BYTES" "$WORK_IMG"
        fi
        img_args=("$WORK_IMG")
        ;;
    esac
    echo "=== rep $rep: $name on port $port" >>"$logf"
    case $name in
    blockrep | blockrep-base | blockrep-tls)
        local bin=$BLOCKREP tls_args=()
        [[ $name == blockrep-tls ]] && tls_args=(--tls require --tls-certificates "$CERTS/server")
        if [[ $name == blockrep-base ]]; then
            [[ -x ${BLOCKREP_BASE:-} ]] || die "blockrep-base needs BLOCKREP_BASE=/path/to/blockrep"
            bin=$BLOCKREP_BASE
        fi
        rm -rf "$STORE"
        "$bin" create "$STORE" --size "${SIZE_MIB}MiB" "${BLOCKREP_CREATE_ARGS[@]}" \
            >>"$logf" 2>&1 || die "blockrep create failed (log: $logf)"
        # setsid: own session, survives the caller's terminal; the pid file is written by
        # the process that then execs the server, so it is the server's pid.
        # shellcheck disable=SC2016 # expanded by the inner bash
        setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pidf" \
            "$bin" serve "$STORE" --nbd "127.0.0.1:$port" --metrics "127.0.0.1:$((port + 500))" \
            "${tls_args[@]}" "${BLOCKREP_SERVE_ARGS[@]}" \
            </dev/null >>"$logf" 2>&1 &
        ;;
    nbdkit-file)
        setsid nbdkit -p "$port" -i 127.0.0.1 -P "$pidf" file "${img_args[@]}" \
            </dev/null >>"$logf" 2>&1
        ;;
    nbdkit-file-tls)
        setsid nbdkit -p "$port" -i 127.0.0.1 -P "$pidf" --tls=require \
            --tls-certificates="$CERTS/server" file "${img_args[@]}" \
            </dev/null >>"$logf" 2>&1
        ;;
    nbdkit-mem)
        setsid nbdkit -p "$port" -i 127.0.0.1 -P "$pidf" memory "$SIZE_BYTES" \
            </dev/null >>"$logf" 2>&1
        ;;
    qemu-wb-threads | qemu-wb-iouring | qemu-none-iouring)
        local cache=writeback aio=threads
        [[ $name == qemu-wb-iouring ]] && aio=io_uring
        [[ $name == qemu-none-iouring ]] && cache=none aio=io_uring
        setsid qemu-nbd -f raw --cache=$cache --aio=$aio -b 127.0.0.1 -p "$port" -t \
            --shared=8 --pid-file="$pidf" --fork "${img_args[@]}" \
            </dev/null >>"$logf" 2>&1
        ;;
    esac
    wait_ready "$port" "$pidf" "$name"
    local fill=0
    case $name in
    blockrep | blockrep-base | blockrep-tls | nbdkit-mem) fill=1 ;;
    *) if [[ $HISTORY == filled ]]; then fill=1; fi ;;
    esac
    [[ $HISTORY == empty ]] && fill=0
    if [[ $fill == 1 ]]; then
        [[ $name == *-tls && $HISTORY == filled ]] \
            && die "HISTORY=filled is not supported for the TLS servers"
        nbdcopy --flush "$IMAGE" "$(uri "$name")" >>"$logf" 2>&1 \
            || die "pre-filling $name failed (log: $logf)"
        # The FLUSH made it durable; sync as well, so that what the file-backed servers
        # wrote back is not still in flight when fio starts.
        [[ $name == blockrep* || $name == nbdkit-mem ]] || sync -f "$WORK_IMG" 2>/dev/null || sync
    fi
    if [[ $name == blockrep* ]]; then
        # The pre-fill sits in blockrep's WAL until a checkpoint writes it to the data file
        # (nbdkit-file did that write during its own pre-fill): wait until the WAL is empty
        # so every server starts from a settled disk.
        for _ in $(seq 600); do
            used=$("$BLOCKREP" status --admin "127.0.0.1:$((port + 500))" --json 2>/dev/null \
                | python3 -c 'import json,sys; print(json.load(sys.stdin)["wal_used_bytes"])' 2>/dev/null || echo x)
            [[ $used == 0 ]] && break
            sleep 0.1
        done
    fi
    sleep "$SETTLE"
}

fio_args() { # workload
    case $1 in
    randwrite4k) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=1" ;;
    randread4k) echo "--rw=randread --bs=4k --iodepth=32 --numjobs=1" ;;
    seqwrite1m) echo "--rw=write --bs=1M --iodepth=8 --numjobs=1" ;;
    fsyncwrite4k) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --numjobs=1" ;;
    fsyncwrite4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32 --fsync=1 --numjobs=1" ;;
    multiconn4) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=4" ;;
    esac
}

ERRORS=0
echo "server,workload,rep,iops,mib_s,clat_p50_us,clat_p99_us,clat_p999_us,sync_p50_us,sync_p99_us,server_cpu_us,fio_cpu_us,status" >"$CSV"
CPU_WINDOW=$((RUNTIME > 3 ? RUNTIME - 2 : 1))
log "results: $CSV, $MD; data: $DATA_DIR; $REPS reps x ${RUNTIME}s; servers: $SERVERS; workloads: $WORKLOADS; history: $HISTORY"
for rep in $(seq "$REPS"); do
    for server in $SERVERS; do
        log "rep $rep/$REPS: $server"
        start_server "$server" "$rep"
        for w in $WORKLOADS; do
            json=$RUN_DIR/$server-$w-$rep.json
            read -r -a wargs <<<"$(fio_args "$w")"
            read -r -a runner <<<"$(fio_runner "$server")"
            if [[ $server == disk-direct ]]; then
                target=(--ioengine=io_uring --direct=1 --filename="$WORK_IMG")
            else
                target=(--ioengine=nbd --uri="$(fio_uri "$server")")
            fi
            cpu_json=$RUN_DIR/$server-$w-$rep.cpu.json
            sampler=
            if [[ $CPU == 1 && -s $PID_DIR/$server.pid ]]; then
                (sleep $((RAMP + 1)); python3 bench/cpu-split.py "$CPU_WINDOW" \
                    "server=$(cat "$PID_DIR/$server.pid")") >"$cpu_json" &
                sampler=$!
            fi
            if "${runner[@]}" fio --name="$w" "${target[@]}" \
                "${wargs[@]}" --group_reporting --size="$SIZE_BYTES" \
                --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
                --norandommap --randrepeat=0 \
                --output-format=json >"$json" 2>"$RUN_DIR/$server-$w-$rep.err"; then
                [[ -z $sampler ]] || wait "$sampler" || true
                row=$(python3 - "$json" "$w" "$cpu_json" "$CPU" <<'PY'
import json, os, sys
path, workload, cpu_path, cpu_on = sys.argv[1:5]
with open(path) as f:
    text = f.read()
# fio may print notes before the JSON document. --group_reporting: one entry for all jobs.
job = json.loads(text[text.index("{"):])["jobs"][0]
d = job["read"] if workload == "randread4k" else job["write"]
if job.get("error"):
    raise SystemExit(f"fio job error {job['error']}")
pct = d["clat_ns"].get("percentile", {})
us = lambda k: f"{pct[k] / 1000:.0f}" if k in pct else ""
sync = job.get("sync", {}).get("lat_ns", {})
spct = sync.get("percentile", {}) if sync.get("N", 0) else {}
sus = lambda k: f"{spct[k] / 1000:.0f}" if k in spct else ""
# CPU µs per I/O: the server's over the sampled window, fio's over the whole run.
server_cpu = fio_cpu = ""
if cpu_on == "1" and d["iops"] > 0:
    if os.path.exists(cpu_path) and os.path.getsize(cpu_path):
        cpu = json.load(open(cpu_path))
        secs = sum(cpu["server"].values())
        server_cpu = f"{secs / (d['iops'] * cpu['window']) * 1e6:.1f}"
    fio_cpu = f"{(job['usr_cpu'] + job['sys_cpu']) / 100 / d['iops'] * 1e6:.1f}"
print(",".join([f"{d['iops']:.0f}", f"{d['bw_bytes'] / 1048576:.1f}",
                us("50.000000"), us("99.000000"), us("99.900000"),
                sus("50.000000"), sus("99.000000"), server_cpu, fio_cpu, "ok"]))
PY
                ) || row=",,,,,,,,,parse-error"
            else
                [[ -z $sampler ]] || wait "$sampler" || true
                row=",,,,,,,,,fio-failed"
            fi
            [[ $row == *,ok ]] || {
                ERRORS=$((ERRORS + 1))
                log "  $w: ${row##*,} (see $RUN_DIR/$server-$w-$rep.err)"
            }
            echo "$server,$w,$rep,$row" >>"$CSV"
            IFS=, read -r iops mibs p50 p99 _ <<<"$row"
            log "  $w: $iops IOPS, $mibs MiB/s, clat p50 $p50 us, p99 $p99 us"
        done
        stop_pidfile "$PID_DIR/$server.pid"
    done
done

# Medians and ratios.
python3 - "$CSV" "$MD" "$REPS" "$RUNTIME" "$SERVERS" "$WORKLOADS" "$DATA_DIR" "$REFS" "$HISTORY" "$CPU" <<'PY'
import csv, statistics, subprocess, sys, platform, os
csv_path, md_path, reps, runtime, servers, workloads, data_dir, refs, history, cpu_on = sys.argv[1:]
servers, workloads, refs = servers.split(), workloads.split(), refs.split()
rows = list(csv.DictReader(open(csv_path)))

def cmd(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"

fs = cmd("sh", "-c", f"df -T {data_dir} | tail -1 | awk '{{print $1\" \"$2}}'")
head = [
    f"# NBD peer benchmark {os.path.basename(md_path)[:-3]}",
    "",
    f"- method: shared/design/nbd.md §6; fio --ioengine=nbd, 1 job (multiconn4: 4), --time_based --runtime={runtime} "
    f"--ramp_time=1 --norandommap --randrepeat=0; {reps} interleaved rep(s), medians",
    f"- history: {history} ("
    + {"fresh": "file-backed servers serve a fresh copy of the image",
       "filled": "file-backed servers' files were filled through NBD and synced",
       "empty": "every server starts on an empty sparse volume, nothing filled"}[history] + ")",
    f"- machine: {os.cpu_count()} cores, kernel {platform.release()}; data dir {data_dir} on {fs}",
    f"- tools: {cmd('fio', '--version')}, {cmd('nbdkit', '--version')}, {cmd('qemu-nbd', '--version')}",
    f"- blockrep: {cmd('git', 'rev-parse', '--short', 'HEAD')}"
    f"{' (dirty tree)' if cmd('sh', '-c', 'git status --porcelain --untracked-files=no | head -1') not in ('', '?') else ''}"
    f"; binary target/release/blockrep built {cmd('date', '-r', 'target/release/blockrep', '+%F %T')}",
    "",
]
metric = {"randwrite4k": ("IOPS", "iops"), "randread4k": ("IOPS", "iops"),
          "seqwrite1m": ("MiB/s", "mib_s"), "fsyncwrite4k": ("write+flush cycles/s", "iops"),
          "fsyncwrite4k-qd32": ("write+flush cycles/s", "iops"), "multiconn4": ("IOPS", "iops")}
FLUSHING = ("fsyncwrite4k", "fsyncwrite4k-qd32")
title = {"randwrite4k": "4 KiB random write, QD32", "randread4k": "4 KiB random read, QD32",
         "seqwrite1m": "1 MiB sequential write, QD8",
         "fsyncwrite4k": "4 KiB random write + FLUSH after every write, QD1",
         "fsyncwrite4k-qd32": "4 KiB random write + FLUSH after every write, QD32",
         "multiconn4": "4 KiB random write, 4 connections at QD32 each (sum)"}

def med(vals):
    vals = [float(v) for v in vals if v not in ("", None)]
    return statistics.median(vals) if vals else None

def fmt(v, nd=0):
    if v is None:
        return "n/a"
    return f"{v:,.{nd}f}".replace(",", " ")

out = head
for w in workloads:
    name, key = metric[w]
    out += [f"## {title[w]} (`{w}`)", ""]
    cols = ["server", f"{name} (median)", "clat p50 µs", "p99 µs", "p99.9 µs"]
    if w in FLUSHING:
        cols += ["FLUSH p50 µs", "FLUSH p99 µs"]
    if cpu_on == "1":
        cols += ["server CPU µs/op", "fio CPU µs/op"]
    cols += [f"× {ref}" for ref in refs] + ["per run"]
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    medians = {}
    for s in servers:
        rs = [r for r in rows if r["server"] == s and r["workload"] == w and r["status"] == "ok"]
        medians[s] = med(r[key] for r in rs)
    for s in servers:
        rs = [r for r in rows if r["server"] == s and r["workload"] == w]
        ok = [r for r in rs if r["status"] == "ok"]
        m = medians[s]
        nd = 1 if key == "mib_s" else 0
        cells = [s, fmt(m, nd), fmt(med(r["clat_p50_us"] for r in ok)),
                 fmt(med(r["clat_p99_us"] for r in ok)), fmt(med(r["clat_p999_us"] for r in ok))]
        if w in FLUSHING:
            cells += [fmt(med(r["sync_p50_us"] for r in ok)), fmt(med(r["sync_p99_us"] for r in ok))]
        if cpu_on == "1":
            cells += [fmt(med(r["server_cpu_us"] for r in ok), 1),
                      fmt(med(r["fio_cpu_us"] for r in ok), 1)]
        for ref in refs:
            r = medians.get(ref)
            cells.append(f"{m / r:.2f}" if m is not None and r else "n/a")
        cells.append(", ".join(fmt(float(r[key]), nd) if r["status"] == "ok" else r["status"]
                               for r in sorted(rs, key=lambda r: int(r["rep"]))))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
bad = [r for r in rows if r["status"] != "ok"]
if bad:
    out += [f"**{len(bad)} failed run(s)**: " +
            ", ".join(f"{r['server']}/{r['workload']}/rep{r['rep']} ({r['status']})" for r in bad), ""]
out += [f"Per-run data: `{csv_path}`; fio JSON and server logs: `{csv_path[:-4]}/`.", ""]
text = "\n".join(out)
open(md_path, "w").write(text)
print(text)
PY

log "wrote $MD and $CSV"
if [[ $ERRORS -gt 0 ]]; then
    die "$ERRORS run(s) failed; see the table"
fi
