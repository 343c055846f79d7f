#!/bin/bash
# Side by side: redis-benchmark against flotilla dev (3 nodes, one process, release) and
# a single Redis with appendonly yes, appendfsync always, in the same run.
set -u
BIN=${FLOTILLA_BIN:-target/release/flotilla}
rm -rf /tmp/benchhome; mkdir -p /tmp/benchhome
HOME=/tmp/benchhome $BIN dev > /tmp/benchdev.out 2>&1 &
DEV=$!
sleep 8
PORT=$(grep -o 'redis-cli -p [0-9]*' /tmp/benchdev.out | head -1 | awk '{print $3}')
rm -rf /tmp/redisdata; mkdir -p /tmp/redisdata
redis-server --port 6390 --dir /tmp/redisdata --appendonly yes --appendfsync always --save '' --daemonize yes > /dev/null
sleep 1
uptime
for P in 1 16; do
  echo "== flotilla dev (port $PORT) -P $P"
  redis-benchmark -p $PORT -t set,get -c 64 -d 100 -r 100000 -n 20000 -P $P -q
  echo "== redis appendfsync always -P $P"
  redis-benchmark -p 6390 -t set,get -c 64 -d 100 -r 100000 -n 20000 -P $P -q
done
uptime
redis-cli -p 6390 shutdown nosave > /dev/null 2>&1
kill $DEV; wait $DEV 2>/dev/null
