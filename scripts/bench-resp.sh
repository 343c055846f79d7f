#!/bin/bash
# The Redis front door side by side, in one run (issue 15):
#   (a) redis-benchmark against 3 `flotilla server` processes on 127.0.0.1 (one node per
#       process, SHARDS shards, 3 replicas, fsync on), through node 1's front door;
#   (b) `flotilla bench put` and `get` (Flotilla's own client protocol) against the same cluster;
#   (c) redis-benchmark against one Redis with appendonly yes, appendfsync always (durable, not
#       replicated).
# Runs never overlap. Needs redis-server and redis-tools (Debian), and a release build:
#   cargo build --release -p flotilla && scripts/bench-resp.sh
# Knobs: FLOTILLA_BIN [target/release/flotilla], SHARDS [4], CLIENTS [64], REQUESTS [100000],
#   PIPELINES ["1 16"], VALUE_SIZE [100], DURATION [10] (flotilla bench), BASE_PORT [27400].
set -euo pipefail
# shellcheck source=../tools/local-cluster.sh
. "$(dirname "$0")/../tools/local-cluster.sh"
BIN=${FLOTILLA_BIN:-target/release/flotilla}
SHARDS=${SHARDS:-4}
CLIENTS=${CLIENTS:-64}
REQUESTS=${REQUESTS:-100000}
PIPELINES=${PIPELINES:-1 16}
VALUE_SIZE=${VALUE_SIZE:-100}
DURATION=${DURATION:-10}
BASE_PORT=${BASE_PORT:-27400}
for c in redis-server redis-benchmark "$BIN"; do
  command -v "$c" >/dev/null || { echo "$c not found (apt-get install redis-server redis-tools; cargo build --release -p flotilla)" >&2; exit 2; }
done
work=$(mktemp -d /var/tmp/flotilla-bench-resp.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

resp_config() { printf 'resp_listen = "127.0.0.1:%d"\nresp_plaintext_loopback = true\n' $((BASE_PORT + 20 + $1)); }
local_cluster_write "$BIN" "$work" "$SHARDS" "$BASE_PORT" $((BASE_PORT + 10)) resp_config
for i in 1 2 3; do
  "$BIN" --log warn server --config "$work/n$i.toml" >"$work/n$i.log" 2>&1 &
  pids+=($!)
done
# On failure the work directory stays, with the servers' logs.
local_cluster_wait "$BIN" "$work" "$SHARDS" || { trap - EXIT; exit 1; }
redis-server --port $((BASE_PORT + 30)) --dir "$work" --appendonly yes --appendfsync always --save '' \
  --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
sleep 1

log "conditions: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $("$BIN" --version); $(redis-server --version | cut -d' ' -f1-3)"
log "$CLIENTS clients, ${VALUE_SIZE}-byte values, $REQUESTS requests per redis-benchmark run, keys random in 100,000"
for P in $PIPELINES; do
  for target in flotilla redis; do
    port=$((BASE_PORT + 21)); [ $target = redis ] && port=$((BASE_PORT + 30))
    echo "== $target -P $P"
    # -q still prints a progress line every 250 ms (ended by a carriage return): keep the summaries.
    redis-benchmark -p "$port" -t set,get -c "$CLIENTS" -d "$VALUE_SIZE" -r 100000 -n "$REQUESTS" -P "$P" -q 2>&1 |
      tr '\r' '\n' | grep 'requests per second' || true
  done
done
for w in put get; do
  echo "== flotilla bench $w"
  "$BIN" bench "$w" --cluster "$work/cluster.json" --clients "$CLIENTS" --value-size "$VALUE_SIZE" \
    --keys 100000 --duration "$DURATION" | tr '\r' '\n' | grep -v ' ops/s ' || true
done
log "load $(cut -d' ' -f1-3 /proc/loadavg)"
