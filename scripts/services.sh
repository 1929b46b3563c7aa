#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and RabbitMQ answer on their default loopback ports: starts any
# that is installed but stopped, and installs (from Debian's packages) any that is missing.
# Also installs what the build and the tests need (a C compiler, Python's headers and venv,
# promtool) when absent.
# Idempotent; safe to run on a machine where everything already runs.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  log "$name did not open port $port"
  return 1
}

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    sudo_if_needed apt-get update -qq
    apt_updated=1
  fi
  log "installing $*"
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Build prerequisites: pyo3 links against libpython; the tests make a virtualenv.
python3 -c 'import sysconfig, sys; sys.exit(0 if sysconfig.get_config_var("Py_ENABLE_SHARED") or sysconfig.get_config_var("LDLIBRARY") else 1)' 2>/dev/null \
  || apt_install python3-dev
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
command -v cc >/dev/null || apt_install build-essential
# promtool checks the metrics' exposition (and, from Debian's prometheus package, nothing else
# of it is started).
command -v promtool >/dev/null || apt_install --no-install-recommends prometheus

# PostgreSQL
if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      # The project's tests and examples connect as postgres over loopback without a password.
      sudo_if_needed sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    done
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting postgresql $version"
  sudo_if_needed pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port 5432 postgresql
fi

# Redis (nothing kept on disk)
if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null
  wait_port 6379 redis
fi

# RabbitMQ
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting rabbitmq"
  sudo_if_needed rabbitmq-server -detached >/dev/null 2>&1 || true
  sudo_if_needed rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 || true
  wait_port 5672 rabbitmq
fi

log "postgresql, redis and rabbitmq are up"
