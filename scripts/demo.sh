#!/usr/bin/env bash
# The main job, end to end: makes sure PostgreSQL, Redis and RabbitMQ run (installing them when
# missing, with sudo when not root), builds the scheduler, the worker and the CLI, starts a
# scheduler and two workers, registers the example workflow (a jq step, a Python step, a jq
# step, a Python step), runs it through the CLI and prints the result. Each run has a namespace
# and a database of its own, and removes them, its queues, its Redis keys and its logs when it
# ends, also when it fails or is interrupted (after printing the logs' last lines on a failure).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
echo "== building"
cargo build -p taskfleet-scheduler -p taskfleet-worker -p taskfleet-cli --bins
bin=target/debug

suffix=$(python3 -c 'import secrets; print(secrets.token_hex(6))')
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
database="taskfleet_demo_$suffix"
export TASKFLEET_NAMESPACE="taskfleet-demo-$suffix"
export TASKFLEET_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$database"
export TASKFLEET_HTTP_ADDR="127.0.0.1:$port"
export TASKFLEET_API_URL="http://127.0.0.1:$port"
export TASKFLEET_SHUTDOWN_GRACE_S=5
logs=$(mktemp -d)

# shellcheck source=scripts/fleet-lib.sh
source scripts/fleet-lib.sh
pids=()
stop() {
  local status=$?
  stop_processes ${pids[@]+"${pids[@]}"}
  if [ "$status" != 0 ]; then
    for log in "$logs"/*.log; do
      [ -f "$log" ] || continue
      echo "== $log (last 50 lines)" >&2
      tail -n 50 "$log" >&2 || true
    done
  fi
  remove_fleet_state "$TASKFLEET_NAMESPACE" "$database"
  rm -rf "$logs"
  exit "$status"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The API needs a key: an admin key of the tenant "demo", for this run only.
TASKFLEET_API_KEY=$(create_api_key "$bin/taskfleet-scheduler" demo admin)
export TASKFLEET_API_KEY
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
curl -fsS "$TASKFLEET_API_URL/readyz" >/dev/null || { echo "the scheduler did not start" >&2; exit 1; }
echo "== fleet up: scheduler on $TASKFLEET_API_URL, 2 workers, namespace $TASKFLEET_NAMESPACE"

echo "== registering the workflow examples/orders.json"
"$bin/taskfleet" workflows register examples/orders.json
echo "== running it on examples/orders-input.json"
"$bin/taskfleet" submit orders --input-file examples/orders-input.json --wait
