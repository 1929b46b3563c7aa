#!/usr/bin/env bash
# The main job, end to end: makes sure PostgreSQL, Redis and RabbitMQ run (installing them when
# missing), builds taskfleet, starts a scheduler and two workers, registers the example workflow
# (a jq step, a Python step, a jq step, a Python step), runs it through the CLI, prints the
# result and stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
echo "== building"
cargo build --workspace --bins
bin=target/debug

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export TASKFLEET_NAMESPACE="taskfleet-demo"
export TASKFLEET_DATABASE_URL="postgres://postgres@127.0.0.1:5432/taskfleet_demo"
export TASKFLEET_HTTP_ADDR="127.0.0.1:$port"
export TASKFLEET_API_URL="http://127.0.0.1:$port"
logs=$(mktemp -d)

pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT

"$bin/taskfleet-scheduler" >"$logs/scheduler.log" 2>&1 &
pids+=($!)
for n in 1 2; do
  "$bin/taskfleet-worker" --python-path examples/steps >"$logs/worker-$n.log" 2>&1 &
  pids+=($!)
done

for _ in $(seq 1 200); do
  curl -fsS "$TASKFLEET_API_URL/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$TASKFLEET_API_URL/readyz" >/dev/null || { echo "the scheduler did not start; see $logs" >&2; exit 1; }
echo "== fleet up: scheduler on $TASKFLEET_API_URL, 2 workers, logs in $logs"

echo "== registering the workflow examples/orders.json"
curl -fsS -X PUT "$TASKFLEET_API_URL/v1/workflows/orders" \
  -H 'content-type: application/json' --data-binary @examples/orders.json
echo
echo "== running it on examples/orders-input.json"
"$bin/taskfleet" submit orders --input-file examples/orders-input.json --wait
