#!/usr/bin/env bash
# The whole test suite: starts (or installs) the services, checks formatting and lints, builds
# the binaries once, runs every Rust test (unit and integration, against the real PostgreSQL,
# Redis and RabbitMQ) and the Python package's tests.
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
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

echo "== python package tests"
venv=target/python-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check pytest ./python
"$venv/bin/python" -m pytest -q python/tests
