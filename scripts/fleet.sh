#!/usr/bin/env bash
# A fleet of your own on this machine, kept running in the background:
#
#   scripts/fleet.sh up [--workers N] [--debug]   start a scheduler and N workers (default 2)
#   scripts/fleet.sh status                       their processes and the scheduler's /readyz
#   scripts/fleet.sh logs [NAME]                  the last lines of each log (or of one)
#   scripts/fleet.sh down [--purge]               stop them; --purge also removes the fleet's
#                                                 database, queues, Redis keys and logs
#
# `up` makes sure PostgreSQL, Redis and RabbitMQ run (installing them when missing, with sudo
# when not root), builds the release binaries (the debug ones with --debug), and starts the
# fleet with a namespace and a database of its own, remembered in .run/fleet/ so that a later
# `up` after a `down` (without --purge) goes on with the same ones. It prints the API's URL and
# the `export` lines that point the CLI and the Python client at it.
set -euo pipefail
cd "$(dirname "$0")/.."

state=.run/fleet
logs=$state/logs
# shellcheck source=scripts/fleet-lib.sh
source scripts/fleet-lib.sh

die() {
  echo "fleet: $*" >&2
  exit 1
}

alive_pids() {
  [ -f "$state/pids" ] || return 0
  while read -r name pid; do
    if kill -0 "$pid" 2>/dev/null; then echo "$name $pid"; fi
  done <"$state/pids"
}

up() {
  local workers=2 profile=release
  while [ $# -gt 0 ]; do
    case $1 in
      --workers) workers=${2:?--workers takes a number}; shift 2 ;;
      --debug) profile=debug; shift ;;
      *) die "up: unknown argument $1" ;;
    esac
  done
  [[ $workers =~ ^[0-9]+$ ]] && [ "$workers" -ge 1 ] || die "up: --workers takes a number of at least 1"
  [ -z "$(alive_pids)" ] || die "a fleet is already up (scripts/fleet.sh status); stop it first"

  scripts/services.sh
  echo "== building ($profile)"
  local build=(cargo build -p taskfleet-scheduler -p taskfleet-worker -p taskfleet-cli --bins)
  if [ "$profile" = release ]; then build+=(--release); fi
  "${build[@]}"
  local bin=$PWD/target/$profile

  mkdir -p "$logs"
  if [ ! -f "$state/env" ]; then
    local suffix port
    suffix=$(python3 -c 'import secrets; print(secrets.token_hex(6))')
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$state/env" <<EOF
export TASKFLEET_NAMESPACE=fleet-$suffix
export TASKFLEET_DATABASE_URL=postgres://postgres@127.0.0.1:5432/taskfleet_fleet_$suffix
export TASKFLEET_HTTP_ADDR=127.0.0.1:$port
export TASKFLEET_API_URL=http://127.0.0.1:$port
EOF
    chmod 600 "$state/env"
  fi
  # shellcheck source=/dev/null
  source "$state/env"
  : >"$state/pids"
  start() {
    local name=$1
    shift
    # A session of its own, so that the terminal's Ctrl-C or hang-up leaves the fleet alone.
    setsid bash -c 'echo $$ >"$0.pid"; exec "$@"' "$logs/$name" "$@" \
      >>"$logs/$name.log" 2>&1 </dev/null &
    for _ in $(seq 1 50); do
      [ -s "$logs/$name.pid" ] && break
      sleep 0.02
    done
    echo "$name $(cat "$logs/$name.pid")" >>"$state/pids"
    rm -f "$logs/$name.pid"
  }
  if [ -z "${TASKFLEET_API_KEY:-}" ]; then
    # An admin key of the tenant "fleet", kept with the fleet's settings (readable by this
    # user only) so that `up` after `down` uses it again.
    TASKFLEET_API_KEY=$(create_api_key "$bin/taskfleet-scheduler" fleet admin) \
      || die "could not make an API key"
    (umask 077 && echo "export TASKFLEET_API_KEY=$TASKFLEET_API_KEY" >>"$state/env")
  fi
  start scheduler "$bin/taskfleet-scheduler"
  for n in $(seq 1 "$workers"); do
    start "worker-$n" "$bin/taskfleet-worker" --python-path examples/steps
  done

  for _ in $(seq 1 300); do
    curl -fsS "$TASKFLEET_API_URL/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS "$TASKFLEET_API_URL/readyz" >/dev/null 2>&1 \
    || die "the scheduler did not become ready; see scripts/fleet.sh logs"
  echo "== fleet up: scheduler and $workers worker(s), logs in $logs"
  echo "API: $TASKFLEET_API_URL"
  echo "To use the CLI ($bin/taskfleet) and the Python client against it:"
  echo "  export TASKFLEET_API_URL=$TASKFLEET_API_URL"
  echo "  export TASKFLEET_NAMESPACE=$TASKFLEET_NAMESPACE"
  echo "  export TASKFLEET_DATABASE_URL=$TASKFLEET_DATABASE_URL"
  echo "  export TASKFLEET_API_KEY=$TASKFLEET_API_KEY   # an admin key of the tenant \"fleet\""
}

status() {
  [ -f "$state/env" ] || die "no fleet here: scripts/fleet.sh up starts one"
  # shellcheck source=/dev/null
  source "$state/env"
  echo "namespace $TASKFLEET_NAMESPACE, API $TASKFLEET_API_URL"
  if [ -f "$state/pids" ]; then
    while read -r name pid; do
      if kill -0 "$pid" 2>/dev/null; then echo "$name (pid $pid) running"; else echo "$name (pid $pid) stopped"; fi
    done <"$state/pids"
  fi
  local ready
  ready=$(curl -sS "$TASKFLEET_API_URL/readyz" 2>/dev/null) || ready="(not answering)"
  echo "readyz: $ready"
}

show_logs() {
  [ -d "$logs" ] || die "no fleet logs here"
  local log
  for log in "$logs"/*.log; do
    [ -f "$log" ] || continue
    if [ $# -gt 0 ] && [ "$(basename "$log" .log)" != "$1" ]; then continue; fi
    echo "== $log (last 50 lines)"
    tail -n 50 "$log"
  done
}

down() {
  local purge=0
  case ${1:-} in
    --purge) purge=1 ;;
    "") ;;
    *) die "down: unknown argument $1" ;;
  esac
  [ -f "$state/env" ] || die "no fleet here"
  # shellcheck source=/dev/null
  source "$state/env"
  local pids=()
  if [ -f "$state/pids" ]; then
    while read -r _ pid; do pids+=("$pid"); done <"$state/pids"
  fi
  stop_processes ${pids[@]+"${pids[@]}"}
  rm -f "$state/pids"
  echo "== fleet stopped"
  if [ "$purge" = 1 ]; then
    remove_fleet_state "$TASKFLEET_NAMESPACE" "${TASKFLEET_DATABASE_URL##*/}"
    rm -rf "$state"
    echo "== its database, queues, Redis keys and logs removed"
  fi
}

command=${1:-}
shift || true
case $command in
  up) up "$@" ;;
  status) status ;;
  logs) show_logs "$@" ;;
  down) down "$@" ;;
  *) echo "usage: scripts/fleet.sh up [--workers N] [--debug] | status | logs [NAME] | down [--purge]" >&2; exit 2 ;;
esac
