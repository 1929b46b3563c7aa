#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document with schemathesis (PyPI): starts a fleet
# of its own from the debug binaries (build them first: cargo build --workspace --bins), with
# authentication on, and has schemathesis generate requests for every operation of
# GET /v1/openapi.json, valid and invalid ones, then check every answer: no 5xx, a status the
# document lists for the operation, a content type and a body that match its schema, the
# headers it names. Needs PostgreSQL, Redis and RabbitMQ running (scripts/services.sh).
#
#   scripts/api-fuzz.sh                     the short form CI runs (a few minutes)
#   scripts/api-fuzz.sh --max-examples 1000 --phases examples,coverage,fuzzing,stateful
#                                           the long form; any schemathesis option goes through
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/fleet-lib.sh
source scripts/fleet-lib.sh
bin=target/debug
require_binaries "$bin" taskfleet-scheduler taskfleet-worker

venv=target/fuzz-venv
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==4.32.5"
fi

trap test_fleet_down EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

logs=target/api-fuzz
# Long polls end before schemathesis gives up on a request (`--request-timeout` below): a job
# the fuzzing made may wait for ever (a queue nobody reads, a rate limit of one a day).
export TASKFLEET_MAX_WAIT_S=10
test_fleet_up "$bin" fuzz "$logs"

status=0
"$venv/bin/schemathesis" --config-file scripts/api-fuzz.toml run "$TASKFLEET_API_URL/v1/openapi.json" \
  --header "Authorization: Bearer $TASKFLEET_API_KEY" \
  --checks all \
  --exclude-checks positive_data_acceptance \
  --max-examples 100 \
  --seed "${TASKFLEET_FUZZ_SEED:-$RANDOM}" \
  --workers 2 \
  --request-timeout 30 \
  --report junit --report-dir "$logs/report" \
  --output-sanitize true \
  "$@" || status=$?
if [ "$status" != 0 ]; then
  echo "the API fuzzing found failures (schemathesis exit status $status); the fleet's logs follow" >&2
  show_logs
  exit "$status"
fi
