#!/usr/bin/env bash
# Runs scripts/demo.sh twice in a row, as a newcomer would, and checks that each run printed the
# example's result and that neither left anything of its own behind: no database, queue or
# Redis key of a demo namespace.
set -euo pipefail
cd "$(dirname "$0")/.."

leftovers() {
  psql -U postgres -h 127.0.0.1 -d postgres -Atq \
    -c "SELECT datname FROM pg_database WHERE datname LIKE 'taskfleet\_demo%'" || true
  timeout 30 rabbitmqctl -q list_queues name 2>/dev/null | grep '^taskfleet-demo' || true
  redis-cli --scan --pattern 'taskfleet-demo*' 2>/dev/null || true
}

before=$(leftovers)
for run in 1 2; do
  output=$(scripts/demo.sh 2>&1) || { echo "$output" >&2; echo "demo run $run failed" >&2; exit 1; }
  if ! grep -q '"summary": "2 lines, 4.80 in all"' <<<"$output"; then
    echo "$output" >&2
    echo "demo run $run did not print the example's result" >&2
    exit 1
  fi
done
after=$(leftovers)
if [ "$before" != "$after" ]; then
  echo "the demo left behind:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "demo: 2 runs printed the example's result and left nothing behind"
