#!/usr/bin/env bash
# Creates (idempotently) the virtualenv of the Celery benchmark and installs
# requirements.txt into it. Prints the venv's python path on its last line
# (the only line on stdout; pip's output goes to stderr).
#
#   bench/celery/setup.sh [VENV]     default VENV: <repo root>/target/bench-celery-venv
#
# Needs python3 with the venv module (Debian: apt-get install python3-venv).
# Set PYTHON to use another interpreter for creating the venv.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/target/bench-celery-venv}"
case "$venv" in
  /*) ;;
  *) venv="$PWD/$venv" ;;
esac
python="${PYTHON:-python3}"
req="$here/requirements.txt"
stamp="$venv/.bench-celery-requirements"

if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "setup.sh: $python lacks the venv/ensurepip modules (Debian: apt-get install python3-venv)" >&2
  exit 2
fi

# A venv whose python no longer runs (moved, or its base interpreter changed) is rebuilt.
if [ -e "$venv" ] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  echo "setup.sh: $venv is broken; recreating it" >&2
  "$python" -m venv --clear "$venv" >&2
elif [ ! -e "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv" >&2
fi

# Skip pip when this exact requirements file is already installed and Celery imports.
want="$(cat "$req")"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$venv/bin/python" -c 'import celery, kombu, redis' >/dev/null 2>&1; then
  echo "setup.sh: $venv is up to date" >&2
else
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
  "$venv/bin/python" -c 'import celery; print("setup.sh: celery", celery.__version__, "installed")' >&2
  printf '%s' "$want" > "$stamp"
fi

echo "$venv/bin/python"
