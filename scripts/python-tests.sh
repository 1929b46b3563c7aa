#!/usr/bin/env bash
# The Python package's tests against a fleet of their own: starts one scheduler and one worker
# from the debug binaries (build them first: cargo build --workspace --bins) with their own
# database, namespace and port, waits until the API is ready and the worker has reported in,
# runs pytest on python/tests with TASKFLEET_API_URL pointing at the fleet, then the examples of
# python/README.md with the package installed into a fresh virtualenv, then stops the fleet and
# removes its database, queues and Redis keys. Needs PostgreSQL, Redis and RabbitMQ running
# (scripts/services.sh). Arguments go to pytest: scripts/python-tests.sh -k cancel
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/fleet-lib.sh
source scripts/fleet-lib.sh
bin=target/debug
require_binaries "$bin" taskfleet-scheduler taskfleet-worker

venv=target/python-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check pytest mypy ./python

# The package declares its types (py.typed): they are checked strictly, as its users' checkers
# read them.
echo "== mypy --strict python/taskfleet"
"$venv/bin/python" -m mypy --config-file python/pyproject.toml python/taskfleet

readme_dir=""
stop_fleet() {
  local status=$?
  test_fleet_down
  if [ -n "$readme_dir" ]; then rm -rf "$readme_dir"; fi
  exit "$status"
}
trap stop_fleet EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A slow step left running must not hold the worker's shutdown for long.
export TASKFLEET_SHUTDOWN_GRACE_S=5
# The API needs a key: an admin key of its own tenant, which the client reads from the
# environment as its users' programs do.
test_fleet_up "$bin" pytest target/python-tests

pytest_status=0
TASKFLEET_REQUIRE_FLEET=1 "$venv/bin/python" -m pytest -q python/tests "$@" || pytest_status=$?
if [ "$pytest_status" != 0 ]; then
  echo "python tests failed (pytest exit status $pytest_status); the fleet's logs follow" >&2
  show_logs
  exit "$pytest_status"
fi

# The README's examples as its readers run them: the package installed (not editable) into a
# brand-new virtualenv, and run from an empty directory, so that nothing is imported from the
# repository; the step module the README shows is written there. TASKFLEET_API_URL (exported
# above) points them at this fleet.
echo "== python/README.md examples from a fresh virtualenv"
readme_started=$SECONDS
repo=$PWD
readme_dir=$(mktemp -d)
readme_python="$readme_dir/venv/bin/python"
python3 -m venv "$readme_dir/venv"
"$readme_python" -m pip install --quiet --disable-pip-version-check ./python
(cd "$readme_dir" && env -u PYTHONPATH "$readme_python" - <<'PY')
import pathlib, sys, sysconfig
import taskfleet
package = pathlib.Path(taskfleet.__file__).resolve().parent
site_packages = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
if package.parent != site_packages:
    sys.exit(f"import taskfleet found {package}, not the package installed in {site_packages}")
if not (package / "py.typed").is_file():
    sys.exit(f"the installed package {package} has no py.typed")
print(f"taskfleet {taskfleet.__version__} installed in {site_packages}, with py.typed")
PY
readme_status=0
(cd "$readme_dir" && env -u PYTHONPATH "$readme_python" \
  "$repo/python/tests/readme_examples.py" "$repo/python/README.md") || readme_status=$?
if [ "$readme_status" != 0 ]; then
  echo "python/README.md's examples failed (exit status $readme_status); the fleet's logs follow" >&2
  show_logs
  exit "$readme_status"
fi
echo "== python/README.md examples passed ($((SECONDS - readme_started)) s)"
