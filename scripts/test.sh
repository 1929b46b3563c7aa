#!/usr/bin/env bash
# The whole test suite: starts (or installs) the services, checks formatting and lints, builds
# the binaries once, runs every Rust test (unit and integration, against the real PostgreSQL,
# Redis and RabbitMQ) and the Python package's tests (against a fleet started from those binaries,
# by scripts/python-tests.sh), the API fuzzed against its OpenAPI document (scripts/api-fuzz.sh),
# the deploy files (scripts/deploy-check.sh), the demo twice (scripts/demo-test.sh), a fleet of
# scripts/fleet.sh (scripts/fleet-test.sh), then a short run of the benchmark against Celery.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (binaries shared by the integration tests)"
cargo build --workspace --bins
echo "== rust tests"
# scripts/services.sh installed promtool: the metrics tests must not skip their lint.
export TASKFLEET_REQUIRE_PROMTOOL=1
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

echo "== python package tests (against a fleet of their own, from the binaries built above)"
scripts/python-tests.sh

echo "== the API fuzzed against its OpenAPI document (schemathesis), on a fleet with keys on"
scripts/api-fuzz.sh

echo "== the deploy files: alert rules and their tests, dashboard, Kubernetes and compose manifests"
scripts/deploy-check.sh

echo "== the demo, twice: it prints the example's result and leaves nothing behind"
scripts/demo-test.sh
echo "== a fleet of one's own (scripts/fleet.sh) driven through the CLI, then purged"
scripts/fleet-test.sh

echo "== benchmark against Celery, short form (a smoke test: no figure is checked)"
target/debug/taskfleet-bench --short
