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

certs=$work/certs
"$BIN" cert ca --dir "$certs" >/dev/null
for i in 1 2 3; do "$BIN" cert node --dir "$certs" --id "$i" >/dev/null; done
"$BIN" cert client --dir "$certs" --name bench --role admin >/dev/null
nodes=""
for i in 1 2 3; do
  {
    printf 'id = %d\ndata_dir = "%s"\n' "$i" "$work/n$i"
    printf 'listen = "127.0.0.1:%d"\nmetrics_listen = "127.0.0.1:%d"\n' $((BASE_PORT + i)) $((BASE_PORT + 10 + i))
    printf 'resp_listen = "127.0.0.1:%d"\nresp_plaintext_loopback = true\n\n' $((BASE_PORT + 20 + i))
    printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n\n' "$certs/ca.pem" "$certs/node-$i.pem" "$certs/node-$i-key.pem"
    for p in 1 2 3; do
      [ "$p" = "$i" ] || printf '[[peers]]\nid = %d\naddr = "127.0.0.1:%d"\n\n' "$p" $((BASE_PORT + p))
    done
    printf '[bootstrap]\nmeta_voters = [1, 2, 3]\nshard_replicas = [1, 2, 3]\nshards = %d\n' "$SHARDS"
  } >"$work/n$i.toml"
  nodes+="${nodes:+,}{\"id\":$i,\"addr\":\"127.0.0.1:$((BASE_PORT + i))\",\"metrics\":\"127.0.0.1:$((BASE_PORT + 10 + i))\"}"
done
printf '{"version":1,"nodes":[%s],"ca":"%s","cert":"%s","key":"%s"}\n' \
  "$nodes" "$certs/ca.pem" "$certs/client-bench.pem" "$certs/client-bench-key.pem" >"$work/cluster.json"
for i in 1 2 3; do
  "$BIN" --log warn server --config "$work/n$i.toml" >"$work/n$i.log" 2>&1 &
  pids+=($!)
done
deadline=$((SECONDS + 90))
until status=$("$BIN" admin status --cluster "$work/cluster.json" --json --timeout 2 2>/dev/null) &&
  [[ $status =~ \"shards_with_leader\":([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -ge "$SHARDS" ]; do
  [ $SECONDS -lt $deadline ] || { echo "no leader for every shard; logs in $work" >&2; trap - EXIT; exit 1; }
  sleep 0.5
done
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
