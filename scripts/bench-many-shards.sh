#!/usr/bin/env bash
# Many shards in real processes (issue 14): 3 `flotilla server` processes on loopback with
# SHARDS shards, each on all three (3 x SHARDS replicas), then a fourth node for the move.
# Measures, in this order:
#   start    time from starting the processes until every group has a leader (the sum of
#            `flotilla_groups_leading` over the nodes' /metrics is SHARDS + 1, the meta group)
#   idle     CPU per node over IDLE_SECONDS once settled (utime+stime from /proc), resident
#            memory per node and per replica
#   list     `admin shards` over the whole map
#   split    `admin split` at a key in the middle, until the new shard has a leader
#   move     a fourth node joins (no replicas, auto-balance off); `admin move` of one replica
#            from node 3 to node 4, which follows the move to its end
#   restart  kill -9 of node 2 and an immediate restart: until node 2 hosts its groups again
#            and every group has a leader (its own included)
#
# Usage: FLOTILLA_BIN=/path/to/release/flotilla SHARDS=10000 scripts/bench-many-shards.sh
# Environment: SHARDS [10000], IDLE_SECONDS [30], SETTLE_SECONDS [20], BASE_PORT [25000]
# (QUIC BASE+1..4, metrics BASE+11..14), LOG_LEVEL [warn], WORK_DIR [/var/tmp], KEEP=1 keeps
# the data and logs. Prints one line per figure (stdout), progress on stderr.
set -euo pipefail

: "${FLOTILLA_BIN:?set FLOTILLA_BIN to a release flotilla binary}"
SHARDS=${SHARDS:-10000}
IDLE_SECONDS=${IDLE_SECONDS:-30}
SETTLE_SECONDS=${SETTLE_SECONDS:-20}
BASE_PORT=${BASE_PORT:-25000}
LOG_LEVEL=${LOG_LEVEL:-warn}
KEEP=${KEEP:-0}
GROUPS_WANTED=$((SHARDS + 1))

work=$(mktemp -d "${WORK_DIR:-/var/tmp}/flotilla-many.XXXXXX")
declare -A pid=()
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
figure() { printf '%s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in "${pid[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$KEEP" = 1 ] || [ "$rc" -ne 0 ]; then log "kept $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

certs=$work/certs
"$FLOTILLA_BIN" cert ca --dir "$certs" >/dev/null
for i in 1 2 3 4; do "$FLOTILLA_BIN" cert node --dir "$certs" --id "$i" >/dev/null; done
"$FLOTILLA_BIN" cert client --dir "$certs" --name bench --role admin >/dev/null
nodes=""
for i in 1 2 3 4; do
  {
    printf 'id = %d\ndata_dir = "%s"\n' "$i" "$work/n$i"
    printf 'listen = "127.0.0.1:%d"\nmetrics_listen = "127.0.0.1:%d"\n\n' $((BASE_PORT + i)) $((BASE_PORT + 10 + i))
    printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n\n' "$certs/ca.pem" "$certs/node-$i.pem" "$certs/node-$i-key.pem"
    # Nodes 1-3 learn node 4's address when it joins (it announces itself to them).
    for p in 1 2 3; do
      [ "$p" = "$i" ] || printf '[[peers]]\nid = %d\naddr = "127.0.0.1:%d"\n\n' "$p" $((BASE_PORT + p))
    done
    [ "$i" = 4 ] || printf '[bootstrap]\nmeta_voters = [1, 2, 3]\nshard_replicas = [1, 2, 3]\nshards = %d\n' "$SHARDS"
  } >"$work/n$i.toml"
  [ "$i" = 4 ] || nodes+="${nodes:+,}{\"id\":$i,\"addr\":\"127.0.0.1:$((BASE_PORT + i))\",\"metrics\":\"127.0.0.1:$((BASE_PORT + 10 + i))\"}"
done
printf '{"version":1,"nodes":[%s],"ca":"%s","cert":"%s","key":"%s"}\n' \
  "$nodes" "$certs/ca.pem" "$certs/client-bench.pem" "$certs/client-bench-key.pem" >"$work/cluster.json"
admin() { "$FLOTILLA_BIN" admin --cluster "$work/cluster.json" "$@"; }

start() {
  "$FLOTILLA_BIN" --log "$LOG_LEVEL" server --config "$work/n$1.toml" >>"$work/n$1.log" 2>&1 &
  pid[$1]=$!
}
# A gauge of node $1's /metrics (empty if the node does not answer: with pipefail and set -e
# a refused or timed-out curl would otherwise end the script).
gauge() {
  { curl -s --max-time 10 "http://127.0.0.1:$((BASE_PORT + 10 + $1))/metrics" 2>/dev/null || true; } |
    awk -v m="$2" '$1 ~ "^"m"[{ ]" || $1 == m { print $2; exit }'
}
leaders() {
  local sum=0 i v
  for i in "$@"; do v=$(gauge "$i" flotilla_groups_leading); sum=$((sum + ${v:-0})); done
  echo "$sum"
}
# Waits (up to $1 s) until every group has a leader among nodes ${@:2}.
wait_leaders() {
  local limit=$1 t0
  shift
  t0=$SECONDS
  until [ "$(leaders "$@")" -ge "$GROUPS_WANTED" ]; do
    if [ $((SECONDS - t0)) -ge "$limit" ]; then
      log "not every group has a leader after ${limit}s: $(leaders "$@") of $GROUPS_WANTED"
      return 1
    fi
    sleep 0.2
  done
}
# Node $1's background work so far: "full_rounds full_us info_builds info_us changed_rounds
# changed_groups" (the reconciler's full rounds, the host's rebuilds of every group's summary,
# some of them inside full rounds, and the reconciler's rounds of what changed).
work_counters() {
  local m
  m=$({ curl -s --max-time 10 "http://127.0.0.1:$((BASE_PORT + 10 + $1))/metrics" 2>/dev/null || true; })
  for name in flotilla_reconcile_full_rounds_total flotilla_reconcile_full_microseconds_total \
    flotilla_host_info_builds_total flotilla_host_info_build_microseconds_total \
    flotilla_reconcile_changed_rounds_total flotilla_reconcile_changed_groups_total; do
    awk -v m="$name" '$1 ~ "^"m"[{ ]" { v = $2 } END { printf "%s ", v + 0 }' <<<"$m"
  done
}
# What node $1 did between two `work_counters` readings $2 and $3, over $4 seconds.
work_figure() {
  awk -v a="$2" -v b="$3" -v s="$4" 'BEGIN {
    split(a, x, " "); split(b, y, " ");
    printf "full_rounds=%d full_round_ms_avg=%.0f full_ms_per_s=%.0f info_builds=%d info_build_ms_avg=%.0f info_ms_per_s=%.0f changed_rounds=%d changed_groups=%d",
      y[1] - x[1], (y[1] > x[1]) ? (y[2] - x[2]) / (y[1] - x[1]) / 1000 : 0, (y[2] - x[2]) / 1000 / s,
      y[3] - x[3], (y[3] > x[3]) ? (y[4] - x[4]) / (y[3] - x[3]) / 1000 : 0, (y[4] - x[4]) / 1000 / s,
      y[5] - x[5], y[6] - x[6] }'
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

log "conditions: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $SHARDS shards on 3 nodes; $("$FLOTILLA_BIN" --version); work dir $work"
figure "shards=$SHARDS replicas=$((3 * SHARDS)) commit=$(git -C "$(dirname "$0")" describe --always --dirty 2>/dev/null || echo unknown)"

t0=$(now)
for i in 1 2 3; do start "$i"; done
wait_leaders 600 1 2 3
figure "start_to_all_leaders_s=$(since "$t0")"

log "settling for ${SETTLE_SECONDS}s"
sleep "$SETTLE_SECONDS"
hz=$(getconf CLK_TCK)
declare -A c0=() w0=()
for i in 1 2 3; do c0[$i]=$(cpu_ticks "${pid[$i]}"); w0[$i]=$(work_counters "$i"); done
sleep "$IDLE_SECONDS"
for i in 1 2 3; do figure "node$i idle $(work_figure "$i" "${w0[$i]}" "$(work_counters "$i")" "$IDLE_SECONDS")"; done
for i in 1 2 3; do
  cpu=$(awk -v a="${c0[$i]}" -v b="$(cpu_ticks "${pid[$i]}")" -v hz="$hz" -v s="$IDLE_SECONDS" 'BEGIN { printf "%.1f", 100 * (b - a) / hz / s }')
  rss=$(rss_kib "${pid[$i]}")
  groups=$(gauge "$i" flotilla_groups)
  # The allocator's live heap and its resident pages (jemalloc): what of the RSS is live data
  # and what is freed pages not yet given back, RocksDB's allocations included.
  heap=$(gauge "$i" flotilla_allocator_allocated_bytes)
  heap_resident=$(gauge "$i" flotilla_allocator_resident_bytes)
  figure "node$i idle_cpu_percent_of_a_core=$cpu rss_mib=$((rss / 1024)) groups=${groups:-?} rss_per_replica_kib=$(awk -v r="$rss" -v g="${groups:-0}" 'BEGIN { if (g > 0) printf "%.1f", r / g; else printf "?" }') heap_allocated_mib=$(awk -v b="${heap:-0}" 'BEGIN { printf "%.0f", b / 1048576 }') heap_resident_mib=$(awk -v b="${heap_resident:-0}" 'BEGIN { printf "%.0f", b / 1048576 }')"
done

t=$(now)
summary=$(admin shards | tail -1)
figure "admin_shards_s=$(since "$t") summary=\"$summary\""

# A key in the middle of the map's keys (dev_split_keys spreads shards over hex prefixes).
t=$(now)
admin split 7fffff00 >/dev/null
GROUPS_WANTED=$((SHARDS + 2))
wait_leaders 60 1 2 3
figure "split_s=$(since "$t")"

start 4
log "node 4 joining"
until [ "$(gauge 4 flotilla_uptime_seconds)" != "" ] && admin nodes 2>/dev/null | awk '$1 == 4 { f = 1 } END { exit !f }'; do sleep 0.5; done
shard=$(admin shards --limit 1 --from 8 | awk '$1 ~ /^[0-9]+$/ { print $1; exit }')
for i in 1 2 3 4; do w0[$i]=$(work_counters "$i"); done
t=$(now)
admin move "$shard" 3 4 >"$work/move.out" 2>&1 || { cat "$work/move.out" >&2; exit 1; }
took=$(since "$t")
figure "move_s=$took shard=$shard"
for i in 1 2 3 4; do figure "node$i during_move $(work_figure "$i" "${w0[$i]}" "$(work_counters "$i")" "$took")"; done

kill -KILL "${pid[2]}"
wait "${pid[2]}" 2>/dev/null || true
t=$(now)
start 2
until [ "$(gauge 2 flotilla_groups)" != "" ]; do sleep 0.1; done
figure "restart_metrics_up_s=$(since "$t")"
wait_leaders 120 1 2 3 4
figure "restart_to_all_leaders_s=$(since "$t") node2_groups=$(gauge 2 flotilla_groups) node2_leading=$(gauge 2 flotilla_groups_leading)"
