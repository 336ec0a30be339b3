#!/usr/bin/env bash
# PostgreSQL on the replicated volume: pgbench TPS on ext4 on a sync-all blockrep primary with
# two replicas, on a single-node blockrep, and on `nbdkit file` (the peer), in one interleaved
# session on one disk. Medians of REPS runs; ratios against nbdkit-file.
#
#   bench/pgbench.sh                          3 reps x 30 s per server
#   REPS=1 RUNTIME=5 bench/pgbench.sh         smoke run
#
# Stack (the recipe of tests/postgres_failover.rs): PostgreSQL -> ext4 -> loop device ->
# nbdfuse (defaults: multi-conn, 4 connections when the server advertises it) -> NBD server.
# Every run starts from nothing: fresh stores / a fresh 1 GiB sparse image, nbdfuse,
# `mkfs.ext4 -q -F`, `mount -o loop`, `initdb -A trust -U postgres -E UTF8 --locale=C
# --data-checksums`, postgres (as the postgres user, unix socket only, fsync=on,
# synchronous_commit=on, full_page_writes=on, wal_sync_method=fdatasync,
# shared_buffers=$SHARED_BUFFERS), `pgbench -i -s $SCALE`, CHECKPOINT, then
# `pgbench -c $CLIENTS -j $JOBS -T $RUNTIME` (tpcb-like). Recorded: TPS excluding initial
# connection time, average latency. Teardown: postgres fast shutdown, umount ext4, umount the
# FUSE mount (nbdfuse exits), SIGTERM the servers; every process is waited for.
#
# Servers (SERVERS, any subset, run in this order within each rep):
#   blockrep-sync-all-2  blockrep serve --commit sync-all with two blockrep replicas on loopback
#   blockrep-single      blockrep serve, no replicas
#   nbdkit-file          nbdkit file IMG (1 GiB sparse file in the same directory)
# blockrep stores: `blockrep create --size $SIZE --wal-size $WAL_SIZE` (replicas are created
# blank the same way and join the primary's volume).
#
# Environment: REPS (3), RUNTIME (30 s), SCALE (10), CLIENTS (4), JOBS (2),
# SHARED_BUFFERS (64MB), SIZE (1GiB), WAL_SIZE (64MiB), SERVERS, PORT_BASE (11970: NBD on
# PORT_BASE, replicas on +1 and +2, postgres on +3), BUILD (1: cargo build --release first),
# CARGO_TARGET_DIR (where the blockrep binary is), BENCH_DATA_DIR (target/bench-data/pgbench),
# BENCH_RESULTS_DIR (target/bench-results), NBDFUSE_ARGS (extra nbdfuse flags, e.g. "-C 1").
# Output: BENCH_RESULTS_DIR/pgbench-<stamp>.csv (one row per run) and .md (medians, ratios,
# versions; also printed). Everything shares this machine's cores: client, postgres, nbdfuse,
# the primary and both replicas, so the replicated numbers include the replicas' CPU.
# Needs root (mount, FUSE), the postgres Debian package, libnbd-bin (nbdfuse), nbdkit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-30}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-4}
JOBS=${JOBS:-2}
SHARED_BUFFERS=${SHARED_BUFFERS:-64MB}
SIZE=${SIZE:-1GiB}
WAL_SIZE=${WAL_SIZE:-64MiB}
DATA=${BENCH_DATA_DIR:-$PWD/target/bench-data/pgbench}
OUT=${BENCH_RESULTS_DIR:-$PWD/target/bench-results}
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/blockrep
PORT=${PORT_BASE:-11970}
PGPORT=$((PORT + 3))
read -r -a NBDFUSE_EXTRA <<<"${NBDFUSE_ARGS:-}"
read -r -a SERVERS <<<"${SERVERS:-blockrep-sync-all-2 blockrep-single nbdkit-file}"

die() { echo "pgbench.sh: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (mount, FUSE, postgres as the postgres user)"
for t in nbdfuse nbdkit mkfs.ext4 mount umount losetup setpriv setsid timeout python3 git; do
    command -v "$t" > /dev/null || die "$t not found (apt-get install libnbd-bin fuse3 nbdkit e2fsprogs mount util-linux)"
done
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"
id postgres > /dev/null 2>&1 || die "no postgres user (apt-get install -y postgresql)"
# The newest PostgreSQL installed the Debian way.
PGBIN=
for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k4,4n); do
    ok=1
    for t in postgres initdb pg_isready psql pgbench; do [[ -x $d/$t ]] || ok=0; done
    [[ $ok == 1 ]] && PGBIN=$d
done
[[ -n $PGBIN ]] || die "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres): apt-get install -y postgresql"
for s in "${SERVERS[@]}"; do
    case $s in blockrep-sync-all-2 | blockrep-single | nbdkit-file) ;; *) die "unknown server $s" ;; esac
done

if [[ ${BUILD:-1} == 1 ]]; then cargo build --release --quiet; fi
[[ -x $BIN ]] || die "$BIN not found (build it, or set CARGO_TARGET_DIR)"
mkdir -p "$DATA" "$OUT"
RUN=$DATA/run
FM=$RUN/fuse
MNT=$RUN/mnt
SOCK=$RUN/sock
(( ${#SOCK} < 90 )) || die "socket directory path too long for a unix socket: $SOCK (set BENCH_DATA_DIR)"
STAMP=$(date +%Y%m%d-%H%M%S)
CSV=$OUT/pgbench-$STAMP.csv
MD=$OUT/pgbench-$STAMP.md
echo "server,rep,tps,lat_avg_ms,transactions,failed,init_s,pg_log_problems" > "$CSV"

as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups env -i PATH=/usr/bin:/bin LC_ALL=C "$@"; }
# /proc/self/mountinfo, not stat: a dead FUSE mount must not hang the check.
mounted() { awk -v p="$1" '$5 == p { f = 1 } END { exit !f }' /proc/self/mountinfo; }
alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }
strip_ansi() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }

SERVER_PIDS=()
NBDFUSE_PID=
PG_PID=

# Waits up to $2 s for pid $1 to exit, then SIGKILLs it; reaps it.
stop_pid() { # pid secs what
    for _ in $(seq $(($2 * 10))); do alive "$1" || break; sleep 0.1; done
    if alive "$1"; then
        echo "pgbench.sh: $3 (pid $1) still running after $2 s: SIGKILL" >&2
        kill -KILL "$1" 2>/dev/null || true
    fi
    wait "$1" 2>/dev/null || true
}

# Tears down whatever is up, in order: postgres, ext4 loop mount, loop devices on our FUSE
# file, FUSE mount (nbdfuse exits), servers. Idempotent; every step is bounded; every
# process is waited for, so the next run cannot meet a leftover.
teardown() {
    local p
    if [[ -n $PG_PID ]]; then
        kill -INT "$PG_PID" 2>/dev/null || true   # fast shutdown
        stop_pid "$PG_PID" 60 postgres
        PG_PID=
    fi
    # Backends left behind by a killed postmaster (every postgres process chdirs into its
    # data directory).
    for p in /proc/[0-9]*; do
        if [[ $(readlink "$p/cwd" 2>/dev/null) == "$MNT"/* ]]; then kill -KILL "${p#/proc/}" 2>/dev/null || true; fi
    done
    if mounted "$MNT"; then
        timeout -k 5 60 umount "$MNT" || { echo "pgbench.sh: umount $MNT failed: lazy unmount" >&2; timeout -k 5 20 umount -l "$MNT" || true; }
    fi
    # `mount -o loop` sets autoclear; detach anything still backed by our FUSE file.
    losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v f="$FM/nbd" '$2 == f { print $1 }' \
        | while read -r p; do timeout -k 5 20 losetup -d "$p" || true; done
    if mounted "$FM"; then
        timeout -k 5 30 umount "$FM" || { echo "pgbench.sh: umount $FM failed: lazy unmount" >&2; timeout -k 5 20 umount -l "$FM" || true; }
    fi
    if [[ -n $NBDFUSE_PID ]]; then
        stop_pid "$NBDFUSE_PID" 30 nbdfuse
        NBDFUSE_PID=
    fi
    for p in "${SERVER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${SERVER_PIDS[@]}"; do stop_pid "$p" 30 "server"; done
    SERVER_PIDS=()
}
trap teardown EXIT
trap 'exit 130' INT TERM

fail() { # message: prints the logs of the current run, then exits (teardown runs on EXIT)
    echo "pgbench.sh: $*" >&2
    for f in "$RUN"/*.log; do
        [[ -f $f ]] || continue
        echo "--- $f (tail)" >&2
        strip_ansi "$f" | tail -20 >&2
    done
    echo "pgbench.sh: logs kept in $RUN" >&2
    exit 1
}

wait_port() { # port pid what
    for _ in $(seq 300); do
        (: > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
        alive "$2" || fail "$3 exited before listening on port $1"
        sleep 0.1
    done
    fail "$3 never opened port $1"
}

port_free() { ! (: > "/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_server() { # name -> sets URI
    local p
    for p in $PORT $((PORT + 1)) $((PORT + 2)) $PGPORT; do
        port_free "$p" || die "port $p is already in use (set PORT_BASE)"
    done
    case $1 in
      blockrep-sync-all-2)
        for r in 1 2; do
            "$BIN" create "$RUN/r$r" --size "$SIZE" --wal-size "$WAL_SIZE" > /dev/null
            setsid "$BIN" replica "$RUN/r$r" --listen 127.0.0.1:$((PORT + r)) --metrics 127.0.0.1:0 \
                > "$RUN/r$r.log" 2>&1 < /dev/null & SERVER_PIDS+=($!)
            wait_port $((PORT + r)) $! "replica r$r"
        done
        "$BIN" create "$RUN/p" --size "$SIZE" --wal-size "$WAL_SIZE" > /dev/null
        setsid "$BIN" serve "$RUN/p" --nbd "127.0.0.1:$PORT" --metrics 127.0.0.1:0 \
            --replica r1=127.0.0.1:$((PORT + 1)) --replica r2=127.0.0.1:$((PORT + 2)) --commit sync-all \
            > "$RUN/p.log" 2>&1 < /dev/null & SERVER_PIDS+=($!)
        wait_port "$PORT" $! "blockrep serve"
        # Both replicas in sync before the first write (blank replicas join at once).
        for _ in $(seq 300); do
            if strip_ansi "$RUN/p.log" | grep -q 'replica=r1 state="in_sync"' \
                && strip_ansi "$RUN/p.log" | grep -q 'replica=r2 state="in_sync"'; then
                break
            fi
            sleep 0.1
        done
        if ! strip_ansi "$RUN/p.log" | grep -q 'replica=r1 state="in_sync"' \
            || ! strip_ansi "$RUN/p.log" | grep -q 'replica=r2 state="in_sync"'; then
            fail "replicas not in sync after 30 s"
        fi
        ;;
      blockrep-single)
        "$BIN" create "$RUN/p" --size "$SIZE" --wal-size "$WAL_SIZE" > /dev/null
        setsid "$BIN" serve "$RUN/p" --nbd "127.0.0.1:$PORT" --metrics 127.0.0.1:0 \
            > "$RUN/p.log" 2>&1 < /dev/null & SERVER_PIDS+=($!)
        wait_port "$PORT" $! "blockrep serve"
        ;;
      nbdkit-file)
        truncate -s "$SIZE" "$RUN/img"
        setsid nbdkit -f -p "$PORT" -i 127.0.0.1 -P "$RUN/nbdkit.pid" file "$RUN/img" \
            > "$RUN/nbdkit.log" 2>&1 < /dev/null & SERVER_PIDS+=($!)
        wait_port "$PORT" $! nbdkit
        ;;
    esac
    URI=nbd://127.0.0.1:$PORT/
}

# nbdfuse exposes the export as $FM/nbd; ext4 on it, loop-mounted on $MNT.
start_fs() {
    setsid nbdfuse "${NBDFUSE_EXTRA[@]}" -P "$RUN/nbdfuse.pid" "$FM" "$URI" \
        > "$RUN/nbdfuse.log" 2>&1 < /dev/null & NBDFUSE_PID=$!
    for _ in $(seq 300); do
        [[ -s $RUN/nbdfuse.pid ]] && mounted "$FM" && break
        alive "$NBDFUSE_PID" || fail "nbdfuse exited"
        sleep 0.1
    done
    mounted "$FM" || fail "nbdfuse not ready in 30 s"
    timeout -k 5 120 mkfs.ext4 -q -F "$FM/nbd" > "$RUN/mkfs.log" 2>&1 || fail "mkfs.ext4 failed"
    timeout -k 5 60 mount -o loop "$FM/nbd" "$MNT" || fail "mount -o loop failed"
    mkdir "$MNT/pgdata"
    chown postgres:postgres "$MNT/pgdata"
    chmod 700 "$MNT/pgdata"
}

start_postgres() {
    timeout -k 5 180 setpriv --reuid=postgres --regid=postgres --init-groups \
        env -i PATH=/usr/bin:/bin LC_ALL=C "$PGBIN/initdb" -D "$MNT/pgdata" \
        -A trust -U postgres -E UTF8 --locale=C --data-checksums > "$RUN/initdb.log" 2>&1 \
        || fail "initdb failed"
    # setsid and setpriv exec (no fork): $! is the postmaster.
    setsid setpriv --reuid=postgres --regid=postgres --init-groups \
        env -i PATH=/usr/bin:/bin LC_ALL=C "$PGBIN/postgres" -D "$MNT/pgdata" -p $PGPORT -k "$SOCK" \
        -c listen_addresses= -c fsync=on -c synchronous_commit=on -c full_page_writes=on \
        -c wal_sync_method=fdatasync -c shared_buffers="$SHARED_BUFFERS" -c log_checkpoints=on \
        > "$RUN/postgres.log" 2>&1 < /dev/null & PG_PID=$!
    for _ in $(seq 900); do
        timeout -k 2 10 "$PGBIN/pg_isready" -q -h "$SOCK" -p $PGPORT -U postgres -d postgres && return
        alive "$PG_PID" || fail "postgres exited while starting"
        sleep 0.1
    done
    fail "postgres did not accept connections within 90 s"
}

pg() { "$PGBIN/$1" -h "$SOCK" -p $PGPORT -U postgres "${@:2}"; }

one_run() { # server rep
    local s=$1 rep=$2 t0 init_s out problems
    if mounted "$MNT" || mounted "$FM"; then die "$MNT or $FM still mounted"; fi
    rm -rf "$RUN"
    mkdir -p "$FM" "$MNT" "$SOCK"
    chmod 755 "$DATA" "$RUN"
    chown postgres:postgres "$SOCK"
    as_postgres test -x "$MNT" || die "the postgres user cannot reach $MNT (a parent directory is not searchable; set BENCH_DATA_DIR)"
    start_server "$s"
    start_fs
    start_postgres
    t0=$(date +%s.%N)
    timeout -k 5 900 "$PGBIN/pgbench" -h "$SOCK" -p $PGPORT -U postgres -i -s "$SCALE" -q postgres \
        > "$RUN/pgbench-init.log" 2>&1 || fail "pgbench -i failed"
    init_s=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")
    timeout -k 5 300 "$PGBIN/psql" -X -q -h "$SOCK" -p $PGPORT -U postgres -d postgres -c CHECKPOINT \
        > /dev/null 2>> "$RUN/pgbench-init.log" || fail "CHECKPOINT failed"
    out=$RUN/pgbench-run.log
    timeout -k 5 $((RUNTIME + 300)) "$PGBIN/pgbench" -h "$SOCK" -p $PGPORT -U postgres \
        -c "$CLIENTS" -j "$JOBS" -T "$RUNTIME" postgres > "$out" 2>&1 || fail "pgbench failed"
    local tps lat xacts failed
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$out")
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' "$out")
    xacts=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")
    [[ -n $tps && -n $lat && -n $xacts ]] || fail "cannot parse pgbench output: $(cat "$out")"
    python3 -c "import sys; sys.exit(float(sys.argv[1]) <= 0)" "$tps" || fail "zero TPS"
    teardown
    # Anything postgres complained about (an fsync failure would be a PANIC), except the
    # FATAL that pg_isready's probes cause while the server starts.
    problems=$(grep -E 'WARNING|ERROR|PANIC|FATAL' "$RUN/postgres.log" \
        | grep -cv 'FATAL:  the database system is starting up' || true)
    if (( problems > 0 )); then
        echo "pgbench.sh: $s rep $rep: postgres log has $problems WARNING/ERROR/PANIC/FATAL lines:" >&2
        grep -E 'WARNING|ERROR|PANIC|FATAL' "$RUN/postgres.log" \
            | grep -v 'FATAL:  the database system is starting up' | head -10 >&2
    fi
    grep -q 'database system is shut down' "$RUN/postgres.log" || fail "postgres did not shut down cleanly"
    echo "$s,$rep,$tps,$lat,$xacts,${failed:-0},$init_s,$problems" >> "$CSV"
    echo "[$(date +%T)] rep $rep $s: tps $tps, latency avg $lat ms, init ${init_s}s"
}

echo "[$(date +%T)] $REPS reps x ${RUNTIME}s, scale $SCALE, $CLIENTS clients; servers: ${SERVERS[*]}; data: $DATA; results: $CSV"
for rep in $(seq "$REPS"); do
    for s in "${SERVERS[@]}"; do
        one_run "$s" "$rep"
    done
done
rm -rf "$RUN"

{
    echo "# pgbench on ext4 over NBD ($STAMP)"
    echo
    echo "Command: \`REPS=$REPS RUNTIME=$RUNTIME SCALE=$SCALE CLIENTS=$CLIENTS JOBS=$JOBS bench/pgbench.sh\`."
    echo "pgbench -i -s $SCALE, CHECKPOINT, then pgbench -c $CLIENTS -j $JOBS -T $RUNTIME (tpcb-like);"
    echo "PostgreSQL fsync=on, synchronous_commit=on, full_page_writes=on, wal_sync_method=fdatasync,"
    echo "shared_buffers=$SHARED_BUFFERS, data checksums; ext4 (mkfs defaults) on a loop device on nbdfuse${NBDFUSE_ARGS:+ ($NBDFUSE_ARGS)};"
    echo "$SIZE volume; blockrep WAL $WAL_SIZE. TPS excludes initial connection time."
    echo
    echo "- blockrep: $(git describe --always --dirty 2>/dev/null || echo unknown) ($BIN)"
    dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | awk '{ print $2 }' | paste -sd ' ' -)
    [[ -z $dirty ]] || echo "  (uncommitted changes built in: $dirty)"
    echo "- $("$PGBIN/postgres" --version)"
    echo "- $(nbdkit --version | head -1); $(nbdfuse --version | head -1)"
    echo "- $(nproc) cores, kernel $(uname -r); data on $(df -T "$DATA" | awk 'NR == 2 { print $2 " (" $1 ")" }')"
    echo "- raw runs: $(basename "$CSV")"
} > "$MD"
python3 - "$CSV" <<'PY' >> "$MD"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
servers = list(dict.fromkeys(r["server"] for r in rows))
med = {}
for s in servers:
    xs = [r for r in rows if r["server"] == s]
    med[s] = (len(xs),
              statistics.median(float(x["tps"]) for x in xs),
              statistics.median(float(x["lat_avg_ms"]) for x in xs),
              min(float(x["tps"]) for x in xs), max(float(x["tps"]) for x in xs),
              statistics.median(float(x["init_s"]) for x in xs))
base = med.get("nbdkit-file", (0, 0))[1]
print()
print("| server | runs | TPS (median) | TPS min–max | latency avg ms | × nbdkit-file | pgbench -i s |")
print("|---|---|---|---|---|---|---|")
for s in servers:
    n, tps, lat, lo, hi, init = med[s]
    ratio = f"**{tps / base:.2f}**" if base else "-"
    print(f"| {s} | {n} | {tps:,.0f} | {lo:,.0f}–{hi:,.0f} | {lat:.2f} | {ratio} | {init:.1f} |")
PY
echo
cat "$MD"
echo
echo "results: $CSV, $MD"
