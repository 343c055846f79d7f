# Sourced by the benchmark scripts: a cluster of three `flotilla server` processes on 127.0.0.1
# (one node per process, every shard on all three, fsync on), as the comparisons run it.

# local_cluster_write BIN DIR SHARDS LISTEN_PORT METRICS_PORT [EXTRA]
# Writes certificates, the three nodes' configurations and DIR/cluster.json: node i listens on
# LISTEN_PORT+i and serves metrics on METRICS_PORT+i. EXTRA, if given, names a function called
# with the node's id whose output is added to that node's top-level settings.
local_cluster_write() {
  local bin=$1 dir=$2 shards=$3 listen=$4 metrics=$5 extra=${6:-} certs=$2/certs nodes="" i p
  mkdir -p "$dir"
  "$bin" cert ca --dir "$certs" >/dev/null
  for i in 1 2 3; do "$bin" cert node --dir "$certs" --id "$i" >/dev/null; done
  "$bin" cert client --dir "$certs" --name bench --role admin >/dev/null
  for i in 1 2 3; do
    {
      printf 'id = %d\ndata_dir = "%s"\n' "$i" "$dir/n$i"
      printf 'listen = "127.0.0.1:%d"\nmetrics_listen = "127.0.0.1:%d"\n' $((listen + i)) $((metrics + i))
      [ -z "$extra" ] || "$extra" "$i"
      printf '\n[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n\n' "$certs/ca.pem" "$certs/node-$i.pem" "$certs/node-$i-key.pem"
      for p in 1 2 3; do
        [ "$p" = "$i" ] || printf '[[peers]]\nid = %d\naddr = "127.0.0.1:%d"\n\n' "$p" $((listen + p))
      done
      printf '[bootstrap]\nmeta_voters = [1, 2, 3]\nshard_replicas = [1, 2, 3]\nshards = %d\n' "$shards"
    } >"$dir/n$i.toml"
    nodes+="${nodes:+,}{\"id\":$i,\"addr\":\"127.0.0.1:$((listen + i))\",\"metrics\":\"127.0.0.1:$((metrics + i))\"}"
  done
  printf '{"version":1,"nodes":[%s],"ca":"%s","cert":"%s","key":"%s"}\n' \
    "$nodes" "$certs/ca.pem" "$certs/client-bench.pem" "$certs/client-bench-key.pem" >"$dir/cluster.json"
}

# local_cluster_wait BIN DIR SHARDS: returns once at least SHARDS shards have a leader, fails
# after 90 s.
local_cluster_wait() {
  local bin=$1 dir=$2 shards=$3 deadline=$((SECONDS + 90)) status
  while :; do
    status=$("$bin" admin status --cluster "$dir/cluster.json" --json --timeout 2 2>/dev/null || true)
    if [[ $status =~ \"shards\":([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -ge "$shards" ] &&
      [[ $status =~ \"shards_with_leader\":([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -ge "$shards" ]; then
      return 0
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "flotilla did not get $shards shards with a leader (last status: ${status:-none}); logs in $dir" >&2
      return 1
    fi
    sleep 0.5
  done
}
