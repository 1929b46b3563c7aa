# Shared by the scripts that start fleets of their own (demo.sh, python-tests.sh, api-fuzz.sh,
# deploy-check.sh):
# starting a test fleet (test_fleet_up/down), stopping their
# processes, and removing what a fleet left in PostgreSQL, RabbitMQ and Redis. Sourced, not run.

# create_api_key SCHEDULER_BINARY TENANT SCOPES: makes an API key in the database that
# TASKFLEET_DATABASE_URL and TASKFLEET_NAMESPACE name (creating the database if it is new) and
# prints it. The secret exists only in what the caller does with it.
create_api_key() {
  local output
  output=$("$1" create-key --tenant "$2" --scopes "$3" --description "made by ${0##*/}") || return 1
  tail -n 1 <<<"$output"
}

# stop_processes PID...: SIGTERM, up to 10 s for them to leave (a worker's grace period is
# longer, but these fleets set a short one or run nothing long), then SIGKILL.
stop_processes() {
  local pid alive
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    alive=0
    for pid in "$@"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    if [ "$alive" = 0 ]; then break; fi
    sleep 0.1
  done
  for pid in "$@"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

# remove_fleet_state NAMESPACE DATABASE: drops the database, the namespace's task queues (those
# its tasks used), its completions and dead-letters queues, and its Redis keys. Best effort:
# what cannot be removed is named by the namespace.
remove_fleet_state() {
  local namespace=$1 database=$2 queues=default queue
  if command -v psql >/dev/null; then
    queues=$(psql -U postgres -h 127.0.0.1 -d "$database" -Atq \
      -c "SELECT DISTINCT queue FROM tasks UNION SELECT 'default'" 2>/dev/null || echo default)
    psql -U postgres -h 127.0.0.1 -d postgres -q \
      -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  if command -v rabbitmqctl >/dev/null; then
    for queue in $queues; do
      timeout 30 rabbitmqctl -q delete_queue "$namespace.tasks.$queue" >/dev/null 2>&1 || true
    done
    for queue in completions dead-letters; do
      timeout 30 rabbitmqctl -q delete_queue "$namespace.$queue" >/dev/null 2>&1 || true
    done
  fi
  if command -v redis-cli >/dev/null; then
    redis-cli --scan --pattern "$namespace:*" 2>/dev/null \
      | xargs -r redis-cli del >/dev/null 2>&1 || true
  fi
}

# test_fleet_up BIN LABEL LOGDIR: starts one scheduler and one worker from BIN with a database,
# namespace and port of their own (named after LABEL and a random suffix), with an admin key of
# tenant LABEL in TASKFLEET_API_KEY, and waits until the API is ready and the worker has
# reported in. Exports TASKFLEET_API_URL, TASKFLEET_API_KEY and the fleet's settings; sets
# `database`, `pids`, `scheduler_log` and `worker_log`. The caller's EXIT trap calls
# test_fleet_down.
test_fleet_up() {
  local bin=$1 label=$2 logs=$3 suffix port
  suffix=$(python3 -c 'import secrets; print(secrets.token_hex(6))')
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  database="taskfleet_${label}_$suffix"
  export TASKFLEET_NAMESPACE="$label$suffix"
  export TASKFLEET_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$database"
  export TASKFLEET_HTTP_ADDR="127.0.0.1:$port"
  export TASKFLEET_API_URL="http://127.0.0.1:$port"
  mkdir -p "$logs"
  scheduler_log="$logs/scheduler.log"
  worker_log="$logs/worker.log"
  pids=()
  TASKFLEET_API_KEY=$(create_api_key "$bin/taskfleet-scheduler" "$label" admin)
  export TASKFLEET_API_KEY
  NO_COLOR=1 "$bin/taskfleet-scheduler" >"$scheduler_log" 2>&1 &
  pids+=($!)
  NO_COLOR=1 "$bin/taskfleet-worker" >"$worker_log" 2>&1 &
  pids+=($!)
  local deadline=$((SECONDS + 60)) pid
  until test_fleet_ready; do
    for pid in "${pids[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "a fleet process exited before the fleet was ready" >&2
        show_logs
        return 1
      fi
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "the fleet was not ready within 60 s ($TASKFLEET_API_URL/readyz and /v1/workers)" >&2
      show_logs
      return 1
    fi
    sleep 0.1
  done
  echo "== fleet up: $TASKFLEET_API_URL, namespace $TASKFLEET_NAMESPACE, database $database, logs in $logs/"
}

# Whether the fleet of test_fleet_up is ready: the scheduler answers /readyz with 200 and the
# worker's heartbeat is listed.
test_fleet_ready() {
  python3 - "$TASKFLEET_API_URL" <<'PY' 2>/dev/null
import json, os, sys, urllib.request
base = sys.argv[1]
urllib.request.urlopen(base + "/readyz", timeout=2)
request = urllib.request.Request(
    base + "/v1/workers", headers={"Authorization": "Bearer " + os.environ["TASKFLEET_API_KEY"]}
)
workers = json.load(urllib.request.urlopen(request, timeout=2))
sys.exit(0 if workers.get("workers") else 1)
PY
}

# show_logs: the last lines of the logs of the fleet of test_fleet_up.
show_logs() {
  local log
  for log in "${scheduler_log:-}" "${worker_log:-}"; do
    [ -n "$log" ] || continue
    echo "== $log (last 200 lines)" >&2
    tail -n 200 "$log" >&2 || true
  done
}

# test_fleet_down: stops the fleet of test_fleet_up and removes what it left.
test_fleet_down() {
  stop_processes ${pids[@]+"${pids[@]}"}
  if [ -n "${database:-}" ]; then
    remove_fleet_state "$TASKFLEET_NAMESPACE" "$database"
  fi
}

# require_binaries BIN NAME...: fails, saying how to build them, unless every NAME is in BIN.
require_binaries() {
  local bin=$1 binary
  shift
  for binary in "$@"; do
    if [ ! -x "$bin/$binary" ]; then
      echo "$bin/$binary is missing: run cargo build --workspace --bins first" >&2
      return 1
    fi
  done
}
