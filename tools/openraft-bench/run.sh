#!/usr/bin/env bash
# flotilla-raft (raft/examples/bench.rs) and openraft (this directory) side by side, in one run
# on one machine: the same shape (3 in-process nodes, in-memory log and state machine, N client
# tasks each writing one empty command at a time), one after the other, never at once, at each
# client count. Prints each run's RESULT line, then a table with flotilla-raft / openraft.
#
# Usage (from the repository's root):
#   tools/openraft-bench/run.sh
# builds both in release (the main workspace's target dir for flotilla-raft, and
# $OPENRAFT_TARGET_DIR [/var/tmp/target-openraft-bench] for this workspace), or, with the
# binaries already built:
#   SYSTEMS="flotilla-raft=/path/examples/bench openraft=/path/openraft-bench" tools/openraft-bench/run.sh
# SYSTEMS may name more flotilla-raft builds (e.g. "before=/tmp/bench-old after=..."): every
# label is run at every client count, and each is compared with the one labelled `openraft`.
#
# Environment (defaults in brackets):
#   CLIENTS ["1 64 256"]   OPS [1000000] writes per run   OPS_1 [100000] writes with 1 client
#   SERVER_WORKERS [2]     CLIENT_WORKERS [1]   (threads of the nodes' and the clients' runtimes)
#   ROUNDS [3]             runs of every system at every client count (the table shows the median
#                          and the best)
set -euo pipefail

CLIENTS=${CLIENTS:-1 64 256}
OPS=${OPS:-1000000}
OPS_1=${OPS_1:-100000}
SERVER_WORKERS=${SERVER_WORKERS:-2}
CLIENT_WORKERS=${CLIENT_WORKERS:-1}
ROUNDS=${ROUNDS:-3}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

log() { printf '[%s] %s\n' "$(date -u +%T)" "$*" >&2; }

if [ -z "${SYSTEMS:-}" ]; then
  log "building flotilla-raft's bench and openraft-bench (release)"
  (cd "$root" && cargo build --release -p flotilla-raft --features testing --example bench)
  flotilla_target=$(cd "$root" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  ort=${OPENRAFT_TARGET_DIR:-/var/tmp/target-openraft-bench}
  (cd "$here" && CARGO_TARGET_DIR=$ort cargo build --release)
  SYSTEMS="flotilla-raft=$flotilla_target/release/examples/bench openraft=$ort/release/openraft-bench"
fi
for s in $SYSTEMS; do
  [ -x "${s#*=}" ] || { echo "not an executable: ${s#*=}" >&2; exit 2; }
done

log "conditions: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for c in $CLIENTS; do
  ops=$OPS
  [ "$c" -eq 1 ] && ops=$OPS_1
  for _ in $(seq "$ROUNDS"); do
    for s in $SYSTEMS; do
      label=${s%%=*}
      log "$label: $c clients, $ops writes (load $(cut -d' ' -f1 /proc/loadavg))"
      line=$("${s#*=}" --clients "$c" --ops "$ops" --server-workers "$SERVER_WORKERS" \
        --client-workers "$CLIENT_WORKERS" | grep '^RESULT ')
      line="RESULT label=$label ${line#RESULT }"
      echo "$line"
      echo "$line" >>"$results"
    done
  done
done

# The table: the median and the best run of each label at each client count (latencies of the
# median run), and the ratio of the medians to openraft's.
awk '
  function median(k,   n, i, j, t, a) {
    n = cnt[k]; for (i = 1; i <= n; i++) a[i] = v[k, i]
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return a[int((n + 1) / 2)]
  }
  { delete f; for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    k = f["label"] SUBSEP f["clients"]
    n = ++cnt[k]; v[k, n] = f["ops_per_s"]; p50[k, f["ops_per_s"]] = f["p50_us"]; p99[k, f["ops_per_s"]] = f["p99_us"]
    if (!(k in best) || f["ops_per_s"] + 0 > best[k] + 0) best[k] = f["ops_per_s"]
    if (!(f["label"] in seen)) { seen[f["label"]] = 1; labels[++nl] = f["label"] }
    if (!(f["clients"] in cseen)) { cseen[f["clients"]] = 1; cs[++nc] = f["clients"] } }
  END {
    printf "| clients | system | writes/s (median) | best | p50 µs | p99 µs | median vs openraft |\n|---|---|---|---|---|---|---|\n"
    for (i = 1; i <= nc; i++) for (j = 1; j <= nl; j++) {
      k = labels[j] SUBSEP cs[i]; o = "openraft" SUBSEP cs[i]
      if (!(k in best)) continue
      m = median(k)
      r = (o in best) ? sprintf("%.2fx", m / median(o)) : "-"
      printf "| %s | %s | %d | %d | %s | %s | %s |\n", cs[i], labels[j], m, best[k], p50[k, m], p99[k, m], r
    } }' "$results"
