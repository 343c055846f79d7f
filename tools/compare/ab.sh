#!/usr/bin/env bash
# Before/after runs of Flotilla builds in one sitting, with leader placement held fixed.
#
# Where the leaders fall at a cluster's start moves a run by up to ±20% (BENCHMARKS.md,
# session 21), more than most changes; so each run starts a fresh 3-process cluster on
# 127.0.0.1 (one node per process, 4 shards by default, fsync on), moves the leaders of the odd
# shards to node 1 and of the even ones to node 2, then runs the workloads with `flotilla bench`. The
# builds alternate, round after round; compare rounds, not single runs.
#
# Usage:
#   tools/compare/ab.sh before=/path/to/flotilla after=/path/to/other/flotilla
# Environment (defaults in brackets):
#   ROUNDS [3]   WORKLOADS ["put64 get64 put1"] (put|get|lget|mixed followed by the clients:
#   put64, get256, lget64 = lease reads, put1...; in the order given, so gets after puts
#   read the keys the puts wrote, and gets alone read an empty store)   DURATION [8] seconds
#   BASE_PORT [27000]   WORK_DIR [/var/tmp]   SHARDS [4] initial shards (odd ones led by node
#   1, even ones by node 2, as with 4)
#   NODE_SETTINGS [""]  top-level lines added to every node's configuration (e.g. "pollers = 2";
#   "runtime_threads = 1", as tools/compare/run.sh runs the servers, for builds that know it)
# Prints one line per workload: time, round, label, leaders per shard, ops/s, p50, p99 and the
# servers' CPU time per operation (every process once; "-" from builds that do not report it).
set -euo pipefail
# Decimal points, not the locale's commas, in the figures printf reads.
export LC_ALL=C
# shellcheck source=../local-cluster.sh
. "$(dirname "$0")/../local-cluster.sh"

ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-put64 get64 put1}
DURATION=${DURATION:-8}
BASE_PORT=${BASE_PORT:-27000}
SHARDS=${SHARDS:-4}
[ $# -ge 1 ] || { sed -n 2,19p "$0" >&2; exit 2; }
for s in "$@"; do
  [ -x "${s#*=}" ] || { echo "not an executable: ${s#*=}" >&2; exit 2; }
done
work=$(mktemp -d "${WORK_DIR:-/var/tmp}/flotilla-ab.XXXXXX")
dir=$work/run
servers=()
stop() {
  [ ${#servers[@]} -eq 0 ] && return
  kill "${servers[@]}" 2>/dev/null || true
  wait "${servers[@]}" 2>/dev/null || true
  servers=()
}
trap 'stop; rm -rf "$work"' EXIT

node_settings() { [ -z "${NODE_SETTINGS:-}" ] || printf '%s\n' "$NODE_SETTINGS"; }

# Starts a fresh cluster with binary $1 in $dir; returns once every shard has a leader.
start() {
  local bin=$1 i
  rm -rf "$dir"
  local_cluster_write "$bin" "$dir" "$SHARDS" $((BASE_PORT + 20)) $((BASE_PORT + 30)) node_settings
  for i in 1 2 3; do
    "$bin" --log warn server --config "$dir/n$i.toml" >"$dir/n$i.log" 2>&1 &
    servers+=($!)
  done
  local_cluster_wait "$bin" "$dir" "$SHARDS"
}

for r in $(seq "$ROUNDS"); do
  for s in "$@"; do
    label=${s%%=*} bin=${s#*=}
    start "$bin"
    c=$dir/cluster.json
    for shard in $(seq "$SHARDS"); do
      "$bin" admin transfer-leader "$shard" $((2 - shard % 2)) --cluster "$c" >/dev/null 2>&1 || true
    done
    sleep 1
    leaders=$("$bin" admin shards --cluster "$c" --json 2>/dev/null |
      grep -oE '"leader":[0-9]+' | cut -d: -f2 | paste -sd, || true)
    for w in $WORKLOADS; do
      kind=${w%%[0-9]*} clients=${w#"$kind"}
      args=("$kind")
      [ "$kind" = lget ] && args=(get --reads lease)
      out=$("$bin" bench "${args[@]}" --clients "$clients" --cluster "$c" --value-size 100 --keys 10000 \
        --duration "$DURATION" --json 2>/dev/null | tail -1)
      cpu=-
      [[ $out =~ \"servers_cpu_us_per_op\":([0-9.]+) ]] && printf -v cpu '%.1f' "${BASH_REMATCH[1]}"
      ops=$(sed -E 's/.*"ops_per_s":([0-9.]+).*/\1/' <<<"$out")
      p50=$(sed -E 's/.*"p50_ms":([0-9.]+).*/\1/' <<<"$out")
      p99=$(sed -E 's/.*"p99_ms":([0-9.]+).*/\1/' <<<"$out")
      printf '%s round %d %-10s leaders %s %-7s %8.0f ops/s p50 %s ms p99 %s ms servers CPU %s us/op\n' \
        "$(date -u +%T)" "$r" "$label" "${leaders:-?}" "$w" "$ops" "$p50" "$p99" "$cpu"
    done
    stop
  done
done
