#!/usr/bin/env bash
# Runs a fleet as a newcomer would, with scripts/fleet.sh (debug binaries, already built):
# up, a run submitted through the CLI, listed with `taskfleet runs`, its logs read with
# `taskfleet logs`, then `down --purge`, after which no process, database, queue or Redis key
# of the fleet is left.
set -euo pipefail
cd "$(dirname "$0")/.."

[ ! -e .run/fleet ] || { echo "a fleet of scripts/fleet.sh is already here (.run/fleet)" >&2; exit 1; }
fail() {
  echo "fleet test: $*" >&2
  scripts/fleet.sh logs >&2 || true
  scripts/fleet.sh down --purge >/dev/null 2>&1 || true
  exit 1
}

scripts/fleet.sh up --debug --workers 2 >/tmp/fleet-test-up.log 2>&1 || { cat /tmp/fleet-test-up.log >&2; fail "up failed"; }
eval "$(grep '^  export ' /tmp/fleet-test-up.log)"
pids=$(awk '{print $2}' .run/fleet/pids)
taskfleet=target/debug/taskfleet

definition='{"name": "fleet-test", "steps": [{"id": "hello", "python_code": "def main(input):\n    print(\"hello from\", input)\n    return input\n"}]}'
output=$("$taskfleet" submit --definition "$definition" --input '"the fleet"' --wait) || fail "the run failed"
[ "$output" = '"the fleet"' ] || fail "unexpected output: $output"
runs=$("$taskfleet" runs --workflow fleet-test --output json) || fail "taskfleet runs failed"
id=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["id"])' <<<"$runs") \
  || fail "the run is not listed: $runs"
logs=$("$taskfleet" logs "$id") || fail "taskfleet logs failed"
grep -q "hello from the fleet" <<<"$logs" || fail "the logs do not hold the step's print: $logs"
scripts/fleet.sh status | grep -q '"postgres":true' || fail "status does not show a ready fleet"

database=${TASKFLEET_DATABASE_URL##*/}
scripts/fleet.sh down --purge >/dev/null || fail "down --purge failed"
for pid in $pids; do
  if kill -0 "$pid" 2>/dev/null; then fail "process $pid is still running"; fi
done
[ -z "$(psql -U postgres -h 127.0.0.1 -d postgres -Atq -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" ] \
  || fail "database $database is left"
! timeout 30 rabbitmqctl -q list_queues name 2>/dev/null | grep -q "^$TASKFLEET_NAMESPACE\." \
  || fail "queues of $TASKFLEET_NAMESPACE are left"
[ -z "$(redis-cli --scan --pattern "$TASKFLEET_NAMESPACE:*" 2>/dev/null)" ] || fail "Redis keys of $TASKFLEET_NAMESPACE are left"
[ ! -e .run/fleet ] || fail ".run/fleet is left"
echo "fleet: up, a run through the CLI, its listing and logs, down --purge: nothing left"
