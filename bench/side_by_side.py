#!/usr/bin/env python3
"""Two builds side by side: a fresh fleet of each (scheduler and worker, a database and a
namespace of its own), then sequential runs alternating between them, so both meet the same
moments of a noisy machine. Prints the p50 and p99 of each, submit -> result.

    python3 bench/side_by_side.py OLD_BIN_DIR NEW_BIN_DIR [--runs 1000] [--workload jq]

Each directory holds `taskfleet-scheduler` and `taskfleet-worker` (copy `target/release/`
aside before rebuilding). PostgreSQL, RabbitMQ and Redis must run on their default local ports
(`scripts/services.sh`); `psql` creates and drops the two databases, and `rabbitmqctl` and
`redis-cli` remove the two namespaces' queues and keys afterwards.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

WORKLOADS = {
    "jq": [{"id": "s", "dataflow": "."}],
    "python": [{"id": "s", "python_code": "def main(x):\n    return x\n"}],
    "chain": [
        {"id": "a", "dataflow": "{n: (.n + 1)}"},
        {"id": "b", "dataflow": ".", "after": ["a"], "input": "{n: .steps.a.n, first: .input.n}"},
        {"id": "c", "dataflow": ".", "after": ["b"], "input": "{total: (.steps.b.n + .steps.b.first)}"},
    ],
}


def psql(sql):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", sql], check=True)


def remove_namespace(name):
    """Deletes the queues and keys of namespace `name`, as far as the tools allow."""
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"],
                            capture_output=True, text=True)
    for queue in listed.stdout.split():
        if queue.startswith(f"{name}."):
            subprocess.run(["rabbitmqctl", "-q", "delete_queue", queue], capture_output=True)
    keys = subprocess.run(["redis-cli", "--scan", "--pattern", f"{name}:*"],
                          capture_output=True, text=True).stdout.split()
    if keys:
        subprocess.run(["redis-cli", "del", *keys], capture_output=True)


def start_fleet(bin_dir, port):
    name = f"sbs_{uuid.uuid4().hex[:12]}"
    psql(f"CREATE DATABASE {name}")
    env = dict(
        os.environ,
        TASKFLEET_DATABASE_URL=f"postgres://postgres@127.0.0.1/{name}",
        TASKFLEET_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f",
        TASKFLEET_REDIS_URL="redis://127.0.0.1:6379",
        TASKFLEET_HTTP_ADDR=f"127.0.0.1:{port}",
        TASKFLEET_NAMESPACE=name,
        RUST_LOG="warn",
    )
    scheduler = subprocess.Popen([os.path.join(bin_dir, "taskfleet-scheduler")], env=env)
    for _ in range(100):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/v1/stats")
            conn.getresponse().read()
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit(f"the scheduler of {bin_dir} did not start")
    worker = subprocess.Popen([os.path.join(bin_dir, "taskfleet-worker")], env=env)
    return name, [scheduler, worker]


def timed_run(conn, steps):
    body = json.dumps({"definition": {"steps": steps}, "input": {"n": 1}})
    started = time.perf_counter()
    conn.request("POST", "/v1/runs", body, {"content-type": "application/json"})
    created = json.loads(conn.getresponse().read())
    conn.request("GET", f"/v1/runs/{created['id']}?wait=10")
    run = json.loads(conn.getresponse().read())
    if run.get("status") != "succeeded":
        sys.exit(f"a run did not succeed: {run}")
    return (time.perf_counter() - started) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="directory of the first build's binaries")
    parser.add_argument("b", help="directory of the second build's binaries")
    parser.add_argument("--runs", type=int, default=1000, help="timed runs on each fleet")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="jq")
    args = parser.parse_args()
    steps = WORKLOADS[args.workload]
    fleets = []
    try:
        for bin_dir, port in ((args.a, 18101), (args.b, 18102)):
            name, processes = start_fleet(bin_dir, port)
            conn = http.client.HTTPConnection("127.0.0.1", port)
            fleets.append({"dir": bin_dir, "db": name, "processes": processes, "conn": conn, "times": []})
        for fleet in fleets:
            for _ in range(50):  # warm-up, not timed
                timed_run(fleet["conn"], steps)
        for i in range(args.runs):
            for fleet in fleets if i % 2 == 0 else reversed(fleets):
                fleet["times"].append(timed_run(fleet["conn"], steps))
        for fleet in fleets:
            times = sorted(fleet["times"])
            p99 = times[max(0, int(len(times) * 0.99) - 1)]
            print(f"{fleet['dir']}: {args.workload} p50 {statistics.median(times):.2f} ms, "
                  f"p99 {p99:.2f} ms over {len(times)} runs")
    finally:
        for fleet in fleets:
            for process in fleet["processes"]:
                process.terminate()
            for process in fleet["processes"]:
                process.wait()
            psql(f"DROP DATABASE IF EXISTS {fleet['db']} WITH (FORCE)")
            remove_namespace(fleet["db"])


if __name__ == "__main__":
    main()
