#!/usr/bin/env python3
"""A concurrent workload through redis-py, a Redis client library nobody here wrote, whose
history the Rust test (tests/resp_python.rs) checks for linearizability with the project's
checker.

Each client is a thread with its own connection to one of the given front doors. It runs, on
a small set of keys, reads and writes whose replies say enough to check: GET, SET .. GET (the
value before it), SET .. NX (a compare-and-swap from "absent"), GETDEL (the value before the
delete) and a plain SET (a blind write). Every value is unique, so each read names the write it
saw.

One JSON object per operation goes to the output file:
  {"client", "key", "op": get|put|del|setnx|set, "value", "invoke", "return", "out"}
with monotonic nanosecond times. "return" is null when the outcome is unknown (a timeout, a
connection lost, or an error reply: the node may have applied the write before the error), and
the checker lets such an operation take effect at any time after its invocation, or never.
"""

import argparse
import json
import random
import threading
import time

import redis


def run_client(client, addr, keys, deadline, seed, out, lock, counts):
    host, port = addr.rsplit(":", 1)
    rng = random.Random(seed)
    conn = redis.Redis(host=host, port=int(port), socket_timeout=10, socket_connect_timeout=10)
    i = 0
    ops = []
    while time.monotonic() < deadline:
        key = rng.choice(keys)
        value = f"c{client}-{i}"
        i += 1
        roll = rng.random()
        if roll < 0.40:
            op, fn = "get", lambda: conn.get(key)
        elif roll < 0.70:
            op, fn = "put", lambda: conn.set(key, value, get=True)
        elif roll < 0.80:
            op, fn = "setnx", lambda: conn.set(key, value, nx=True)
        elif roll < 0.90:
            op, fn = "del", lambda: conn.getdel(key)
        else:
            op, fn = "set", lambda: conn.set(key, value)
        invoke = time.monotonic_ns()
        try:
            reply = fn()
            ret = time.monotonic_ns()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            counts["unknown"] += 1
            ops.append(dict(client=client, key=key, op=op, value=value, invoke=invoke, out=None, error=str(e)))
            # A lost connection: a new one, as an application would.
            conn = redis.Redis(host=host, port=int(port), socket_timeout=10, socket_connect_timeout=10)
            continue
        except redis.exceptions.ResponseError as e:
            counts["unknown"] += 1
            ops.append(dict(client=client, key=key, op=op, value=value, invoke=invoke, out=None, error=str(e)))
            continue
        if op == "setnx":
            out_value = reply is True
        elif op == "set":
            out_value = reply is True
        else:
            out_value = None if reply is None else reply.decode()
        counts["done"] += 1
        ops.append(dict(client=client, key=key, op=op, value=value, invoke=invoke, ret=ret, out=out_value))
    with lock:
        for o in ops:
            out.write(json.dumps(o) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addrs", required=True, help="host:port,host:port,... (clients spread over them)")
    p.add_argument("--keys", required=True, help="key,key,...")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    addrs = a.addrs.split(",")
    keys = a.keys.split(",")
    deadline = time.monotonic() + a.seconds
    lock = threading.Lock()
    counts = {"done": 0, "unknown": 0}
    with open(a.out, "w") as out:
        threads = [
            threading.Thread(
                target=run_client,
                args=(c, addrs[c % len(addrs)], keys, deadline, a.seed * 1000 + c, out, lock, counts),
            )
            for c in range(a.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps(dict(redis_py=redis.__version__, **counts)))


if __name__ == "__main__":
    main()
