# Shared by the scripts that start fleets of their own (demo.sh, python-tests.sh): stopping their
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
