#!/usr/bin/env bash
# Flotilla and etcd side by side on this machine (DESIGN.md, "Measuring"): the same load
# (`flotilla bench` and tools/etcd-bench, one after the other, never at once) against
#   (a) a 3-member etcd cluster on 127.0.0.1 (default fsync, one Raft group), then
#   (b) 3 `flotilla server` processes on 127.0.0.1 (one node per process, SHARDS shards).
# Each cluster is fresh (new data directories) and runs put, then get, then mixed: the get run
# reads the keys the put run wrote (neither bench prefills).
#
# Usage:
#   FLOTILLA_BIN=/path/to/release/flotilla ETCD_BENCH_BIN=/path/to/etcd-bench tools/compare/run.sh
#
# Environment (defaults in brackets):
#   DURATION [20]  seconds per run     CLIENTS [64]     VALUE_SIZE [100]    KEYS [10000]
#   SHARDS [4]     Flotilla's initial shards (as `flotilla dev`)
#   ROUNDS [1]     rounds of every system, each on fresh clusters; the order of the systems
#                  alternates from round to round (etcd first in odd rounds), so a drift of the
#                  machine weighs on both, and the ratio table gives each round's Flotilla/etcd
#                  ratio and their median
#   SYSTEMS ["etcd flotilla"]          WORKLOADS ["put get mixed"]; also `lease-get`: Flotilla's
#                                      gets served under the leader's lease (etcd skips it)
#   WORKERS_PER_CONN [8]   etcd-bench workers per gRPC connection
#   RUNTIME_THREADS [1]    each Flotilla server's `runtime_threads` (empty: one per core). Three
#                          servers share the machine, so each gets its share of the cores:
#                          one each on two cores serves more, sooner (BENCHMARKS.md, session 28).
#                          etcd keeps Go's default GOMAXPROCS, its best here (session 24)
#   BENCH_THREADS [1]      `flotilla bench --threads` (its default too; empty: not given, for
#                          builds older than the flag, with RUNTIME_THREADS= as well)
#   ETCD_BIN [etcd]        ETCDCTL_BIN [etcdctl]
#   BASE_PORT [24000]      etcd uses BASE+1..3 (clients) and BASE+11..13 (peers);
#                          Flotilla BASE+21..23 (QUIC, UDP) and BASE+31..33 (metrics)
#   LOG_LEVEL [warn]       log level of both servers
#   WORK_DIR               parent of the temporary directory [/var/tmp]
#   KEEP=1                 keep the temporary directory (data, logs, configs)
#
# Output (stdout): one JSON line per run, the bench's own summary with "system" added in front
# and the CPU time per operation of the three server processes ("cpu_servers_us_per_op") and
# of the load generator ("cpu_bench_us_per_op"), from /proc and the shell's `times`, the same
# way for both systems, over the load generator's whole life (connecting, and for Flotilla the
# two reads of /metrics, included; `flotilla bench`'s own "servers_cpu_us_per_op" on the same
# line counts only the timed part, from /metrics); then a table. Progress and conditions go to stderr.
#
# Why CPU per operation: the load generator shares the machine's cores with the servers, so
# operations per second measure the machine as much as the system; the CPU an operation costs
# moves less from run to run and compares the two systems' work directly.
set -euo pipefail
# Decimal points, not the locale's commas, in what `times` prints and printf reads.
export LC_ALL=C
# shellcheck source=../local-cluster.sh
. "$(dirname "$0")/../local-cluster.sh"

: "${FLOTILLA_BIN:?set FLOTILLA_BIN to a release flotilla binary}"
: "${ETCD_BENCH_BIN:?set ETCD_BENCH_BIN to the etcd-bench binary (tools/etcd-bench)}"
ETCD_BIN=${ETCD_BIN:-etcd}
ETCDCTL_BIN=${ETCDCTL_BIN:-etcdctl}
DURATION=${DURATION:-20}
CLIENTS=${CLIENTS:-64}
VALUE_SIZE=${VALUE_SIZE:-100}
KEYS=${KEYS:-10000}
SHARDS=${SHARDS:-4}
SYSTEMS=${SYSTEMS:-etcd flotilla}
WORKLOADS=${WORKLOADS:-put get mixed}
WORKERS_PER_CONN=${WORKERS_PER_CONN:-8}
RUNTIME_THREADS=${RUNTIME_THREADS-1}
BENCH_THREADS=${BENCH_THREADS-1}
BASE_PORT=${BASE_PORT:-24000}
LOG_LEVEL=${LOG_LEVEL:-warn}
KEEP=${KEEP:-0}
ROUNDS=${ROUNDS:-1}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive whole number: $ROUNDS" >&2; exit 2; }
round=1

for bin in "$FLOTILLA_BIN" "$ETCD_BENCH_BIN"; do
  [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
done
for bin in "$ETCD_BIN" "$ETCDCTL_BIN"; do
  command -v "$bin" >/dev/null || { echo "$bin not found (apt-get install etcd-server etcd-client)" >&2; exit 2; }
done

# etcd and etcdctl read every ETCD_* / ETCDCTL_* variable as a flag: this script's own must not
# reach them (ETCD_BENCH_BIN would only warn, but a stray one could change their settings).
etcd_env=(env -u ETCD_BENCH_BIN -u ETCD_BIN -u ETCDCTL_BIN)

work=$(mktemp -d "${WORK_DIR:-/var/tmp}/flotilla-compare.XXXXXX")
pids=()
results=()
measured=()  # the server processes whose CPU time a run counts

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

# Stops the given processes one after the other: SIGTERM, then SIGKILL after 30 s.
stop() {
  local p
  for p in "$@"; do
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ "${#pids[@]}" -eq 0 ] || stop "${pids[@]}"
  # Kept for a look at the logs after a failure (not after Ctrl-C or SIGTERM).
  if [ "$KEEP" = 1 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; }; then
    log "kept $work (logs: $work/*/*.log)"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A port must be free before a server is started on it (a stale server would be measured).
check_free() {
  local proto=$1 port=$2
  if ss -H -ln"${proto}" "sport = :$port" 2>/dev/null | grep -q .; then
    echo "port $port/$([ "$proto" = t ] && echo tcp || echo udp) is in use: set BASE_PORT" >&2
    exit 2
  fi
}

# CPU time (user and system, clock ticks) of the processes given, summed.
cpu_ticks() {
  local p total=0 stat rest f
  for p in "$@"; do
    stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    rest=${stat##*) }  # the fields after the command name (which may hold spaces)
    read -r -a f <<<"$rest"
    total=$((total + f[11] + f[12]))  # utime and stime: fields 14 and 15 of the file
  done
  echo "$total"
}

# CPU time this shell's finished children used, user and system, in milliseconds. `times`
# runs in this shell (a command substitution would ask a subshell, which has no children yet).
children_cpu_ms() {
  times >"$work/times"
  # The second line, e.g. "0m1.230s 0m0.450s".
  awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60000 + a[2] * 1000 } printf "%.0f", t }' "$work/times"
}

# Runs one bench, prints its JSON line with the system's name and the CPU figures added, and
# keeps it for the table.
record() {
  local system=$1 workload=$2 line t0 t1 c0 c1 ops hz
  shift 2
  log "$system $workload: ${DURATION}s, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  hz=$(getconf CLK_TCK)
  t0=$(cpu_ticks "${measured[@]}")
  children_cpu_ms >"$work/c0"
  line=$("$@")
  t1=$(cpu_ticks "${measured[@]}")
  children_cpu_ms >"$work/c1"
  c0=$(cat "$work/c0") c1=$(cat "$work/c1")
  # The run's own count: the first "ops" of the line (timeline rows, if any, come later).
  ops=$(grep -o '"ops":[0-9]*' <<<"$line" | head -1 | cut -d: -f2)
  [[ $ops =~ ^[0-9]+$ ]] || ops=0
  # A server that died during the run took its CPU time out of the sum (and its exit added it
  # to this shell's children): no figure rather than a wrong one.
  local cpu='"cpu_servers_us_per_op":null,"cpu_bench_us_per_op":null' p alive=1
  for p in "${measured[@]}"; do kill -0 "$p" 2>/dev/null || alive=0; done
  if [ "$alive" = 1 ] && [ "$ops" -gt 0 ]; then
    cpu=$(awk -v t="$((t1 - t0))" -v hz="$hz" -v ops="$ops" -v c="$((c1 - c0))" \
      'BEGIN { printf "\"cpu_servers_us_per_op\":%.1f,\"cpu_bench_us_per_op\":%.1f", t * 1e6 / hz / ops, c * 1e3 / ops }')
  else
    log "$system $workload: no CPU figures (a server stopped during the run, or no operation succeeded)"
  fi
  line="{\"system\":\"$system\",\"round\":$round,$cpu,${line#\{}"
  [ "$workload" = lease-get ] && line=${line/\"workload\":\"get\"/\"workload\":\"lease-get\"}
  printf '%s\n' "$line"
  results+=("$line")
}

run_etcd() {
  local dir=$work/round$round/etcd i initial="" endpoints=""
  mkdir -p "$dir"
  for i in 1 2 3; do
    check_free t $((BASE_PORT + i))
    check_free t $((BASE_PORT + 10 + i))
    initial+="${initial:+,}m$i=http://127.0.0.1:$((BASE_PORT + 10 + i))"
    endpoints+="${endpoints:+,}127.0.0.1:$((BASE_PORT + i))"
  done
  local members=()
  for i in 1 2 3; do
    # 8 GiB backend quota (etcd's largest recommended): the runs never compact, and the default
    # 2 GiB must not raise the NOSPACE alarm in the middle of a long run.
    "${etcd_env[@]}" "$ETCD_BIN" --name "m$i" --data-dir "$dir/m$i" \
      --listen-client-urls "http://127.0.0.1:$((BASE_PORT + i))" \
      --advertise-client-urls "http://127.0.0.1:$((BASE_PORT + i))" \
      --listen-peer-urls "http://127.0.0.1:$((BASE_PORT + 10 + i))" \
      --initial-advertise-peer-urls "http://127.0.0.1:$((BASE_PORT + 10 + i))" \
      --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token flotilla-compare \
      --quota-backend-bytes $((8 * 1024 * 1024 * 1024)) \
      --logger zap --log-outputs stderr --log-level "$LOG_LEVEL" \
      >"$dir/m$i.log" 2>&1 &
    pids+=($!)
    members+=($!)
  done
  measured=("${members[@]}")
  log "etcd: waiting for 3 healthy members ($endpoints)"
  local deadline=$((SECONDS + 60))
  until "${etcd_env[@]}" "$ETCDCTL_BIN" --endpoints="$endpoints" --command-timeout=2s endpoint health >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "etcd did not become healthy; logs in $dir" >&2
      exit 1
    fi
    sleep 0.5
  done
  local w
  for w in $WORKLOADS; do
    # Lease reads are Flotilla's; etcd's reads are linearizable through ReadIndex only.
    [ "$w" = lease-get ] && continue
    record etcd "$w" "$ETCD_BENCH_BIN" "$w" --endpoints "$endpoints" --workers-per-conn "$WORKERS_PER_CONN" \
      --clients "$CLIENTS" --value-size "$VALUE_SIZE" --keys "$KEYS" --duration "$DURATION" --json
  done
  log "etcd: stopping (data dir $(du -sh "$dir" | cut -f1))"
  stop "${members[@]}"
  pids=()
  log "etcd: stopped"
}

node_settings() { [ -z "$RUNTIME_THREADS" ] || printf 'runtime_threads = %s\n' "$RUNTIME_THREADS"; }

run_flotilla() {
  local dir=$work/round$round/flotilla i
  for i in 1 2 3; do
    check_free u $((BASE_PORT + 20 + i))
    check_free t $((BASE_PORT + 30 + i))
  done
  local_cluster_write "$FLOTILLA_BIN" "$dir" "$SHARDS" $((BASE_PORT + 20)) $((BASE_PORT + 30)) node_settings
  local servers=()
  for i in 1 2 3; do
    "$FLOTILLA_BIN" --log "$LOG_LEVEL" server --config "$dir/n$i.toml" >"$dir/n$i.log" 2>&1 &
    pids+=($!)
    servers+=($!)
  done
  measured=("${servers[@]}")
  log "flotilla: waiting for $SHARDS shards with a leader"
  local_cluster_wait "$FLOTILLA_BIN" "$dir" "$SHARDS" || exit 1
  # Where the elections put the leaders (it moves a run by up to ±20%, BENCHMARKS.md session 21).
  log "flotilla: leaders of shards 1..$SHARDS on nodes $("$FLOTILLA_BIN" admin shards --cluster "$dir/cluster.json" \
    --json 2>/dev/null | grep -oE '"leader":[0-9]+' | cut -d: -f2 | paste -sd, || true)"
  local w
  for w in $WORKLOADS; do
    local args=("$w")
    [ "$w" = lease-get ] && args=(get --reads lease)
    record flotilla "$w" "$FLOTILLA_BIN" bench "${args[@]}" --cluster "$dir/cluster.json" \
      --clients "$CLIENTS" --value-size "$VALUE_SIZE" --keys "$KEYS" --duration "$DURATION" \
      ${BENCH_THREADS:+--threads "$BENCH_THREADS"} --json
  done
  log "flotilla: stopping (data dir $(du -sh "$dir" | cut -f1))"
  stop "${servers[@]}"
  pids=()
  log "flotilla: stopped"
}

# The value of a numeric or string field of a flat JSON object.
field() { sed -E "s/.*\"$2\":\"?([^,\"}]*).*/\1/" <<<"$1"; }

log "conditions: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $CLIENTS clients, ${VALUE_SIZE}-byte values, $KEYS keys, ${DURATION}s per run"
log "etcd: $("${etcd_env[@]}" "$ETCD_BIN" --version | head -1); flotilla: $("$FLOTILLA_BIN" --version) ($FLOTILLA_BIN), $SHARDS shards"
log "etcd-bench: $WORKERS_PER_CONN workers per connection; flotilla: runtime_threads ${RUNTIME_THREADS:-default}, bench --threads ${BENCH_THREADS:-default}; this checkout: $(git -C "$(dirname "$0")" describe --always --dirty 2>/dev/null || echo unknown)"
log "work dir: $work"
for round in $(seq "$ROUNDS"); do
  order=$SYSTEMS
  # Even rounds run the systems in the reverse order.
  [ $((round % 2)) = 0 ] && order=$(tr ' ' '\n' <<<"$SYSTEMS" | tac | paste -sd' ')
  for s in $order; do
    [ "$ROUNDS" = 1 ] || log "round $round of $ROUNDS: $s"
    case $s in
      etcd) run_etcd ;;
      flotilla) run_flotilla ;;
      *) echo "unknown system: $s" >&2; exit 2 ;;
    esac
  done
done

echo
printf '| round | system | workload | ops/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors (unknown/other) | servers CPU µs/op | bench CPU µs/op |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|---|\n'
for r in "${results[@]}"; do
  printf '| %s | %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.1f | %s/%s | %s | %s |\n' \
    "$(field "$r" round)" "$(field "$r" system)" "$(field "$r" workload)" "$(field "$r" ops_per_s)" "$(field "$r" p50_ms)" \
    "$(field "$r" p90_ms)" "$(field "$r" p99_ms)" "$(field "$r" p999_ms)" "$(field "$r" max_ms)" \
    "$(field "$r" errors_unknown)" "$(field "$r" errors_other)" \
    "$(field "$r" cpu_servers_us_per_op)" "$(field "$r" cpu_bench_us_per_op)"
done

# Flotilla's ops/s over etcd's, per workload, round by round and the median (both systems must
# have run the workload in the round).
if [[ " $SYSTEMS " == *" etcd "* && " $SYSTEMS " == *" flotilla "* ]]; then
  echo
  printf '| workload | Flotilla/etcd ops/s, round by round | median |\n|---|---|---|\n'
  for r in "${results[@]}"; do
    printf '%s %s %s %s\n' "$(field "$r" workload)" "$(field "$r" round)" "$(field "$r" system)" "$(field "$r" ops_per_s)"
  done | awk '
    { ops[$1 " " $2 " " $3] = $4; if (!($1 in seen)) { seen[$1] = 1; order[++n] = $1 } if ($2 > rounds) rounds = $2 }
    END {
      for (i = 1; i <= n; i++) {
        w = order[i]; k = 0; line = ""
        for (r = 1; r <= rounds; r++) {
          e = ops[w " " r " etcd"]; f = ops[w " " r " flotilla"]
          if (e > 0 && f > 0) { x[++k] = f / e; line = line (line == "" ? "" : " / ") sprintf("%.2fx", f / e) }
        }
        if (k == 0) continue
        for (a = 1; a <= k; a++) for (b = a + 1; b <= k; b++) if (x[b] < x[a]) { t = x[a]; x[a] = x[b]; x[b] = t }
        med = (k % 2) ? x[(k + 1) / 2] : (x[k / 2] + x[k / 2 + 1]) / 2
        printf "| %s | %s | %.2fx |\n", w, line, med
        delete x
      }
    }'
fi
