#!/usr/bin/env bash
# Checks what deploy/ holds without a cluster or a Docker engine:
#   - the alert rules: `promtool check rules`, their unit tests (`promtool test rules`), a firing
#     and a quiet case for every alert, and a runbook section in docs/operations.md for each;
#     the compose Prometheus configuration (`promtool check config`);
#   - the Grafana dashboard: JSON, and every query parses as PromQL (promtool);
#   - the Kubernetes manifests, rendered offline (`kubectl kustomize`, and the small renderer of
#     scripts/deploy-check.py, whose objects must match; without kubectl, that renderer alone),
#     once as they are and once with the HPA in place of the KEDA ScaledObject: every manifest
#     validated with kubernetes-validate, the ScaledObject against the KEDA schema of
#     deploy/kubernetes/schemas/;
#   - deploy/compose.yaml against the Compose specification's JSON schema (deploy/schemas/);
#   - that every metric the dashboard and the rules name, with the labels they use, is one a
#     real scheduler and worker serve: it starts a fleet of its own (one scheduler, one worker,
#     from TASKFLEET_BIN_DIR, target/debug by default), runs a job through it and scrapes both.
# Needs promtool, Python 3 (a virtualenv under target/ gets PyYAML, jsonschema and
# kubernetes-validate from PyPI), PostgreSQL, Redis and RabbitMQ running (scripts/services.sh)
# and the binaries (cargo build --workspace --bins).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${TASKFLEET_BIN_DIR:-target/debug}
work=target/deploy-check
venv=target/deploy-check-venv
requirements=(kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4)

for binary in taskfleet-scheduler taskfleet-worker; do
  if [ ! -x "$bin/$binary" ]; then
    echo "$bin/$binary is missing: run cargo build --workspace --bins first (or set TASKFLEET_BIN_DIR)" >&2
    exit 1
  fi
done
command -v promtool >/dev/null || { echo "promtool is missing (scripts/services.sh installs it)" >&2; exit 1; }

if [ "$(cat "$venv/requirements" 2>/dev/null)" != "${requirements[*]}" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
  echo "${requirements[*]}" >"$venv/requirements"
fi
check() { "$venv/bin/python" scripts/deploy-check.py "$@"; }
rm -rf "$work"
mkdir -p "$work"

echo "== alert rules"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
check alert-tests deploy/prometheus/alerts.yml deploy/prometheus/alerts_test.yml docs/operations.md
promtool check config deploy/prometheus/prometheus.yml

echo "== grafana dashboard"
check dashboard-rules deploy/grafana/taskfleet.json "$work/dashboard-rules.yml"
promtool check rules "$work/dashboard-rules.yml"

echo "== kubernetes manifests"
# The fleet as it is, and with worker-hpa.yaml listed in place of worker-scaledobject.yaml.
variant="$work/kubernetes-hpa"
cp -r deploy/kubernetes "$variant"
sed -i 's/^  - worker-scaledobject.yaml$/  - worker-hpa.yaml/' "$variant/kustomization.yaml"
grep -q '^  - worker-hpa.yaml$' "$variant/kustomization.yaml"
for name in kubernetes kubernetes-hpa; do
  source_dir=deploy/kubernetes
  [ "$name" = kubernetes ] || source_dir=$variant
  check render "$source_dir" >"$work/$name-rendered.yaml"
  if command -v kubectl >/dev/null; then
    kubectl kustomize "$source_dir" >"$work/$name.yaml"
    check same-objects "$work/$name.yaml" "$work/$name-rendered.yaml"
  else
    echo "  (no kubectl: the manifests are those of scripts/deploy-check.py's renderer)"
    cp "$work/$name-rendered.yaml" "$work/$name.yaml"
  fi
done
grep -q '^kind: ScaledObject$' "$work/kubernetes.yaml"
grep -q '^kind: HorizontalPodAutoscaler$' "$work/kubernetes-hpa.yaml"
check kubernetes "$work/kubernetes.yaml" "$work/kubernetes-hpa.yaml"

echo "== compose file"
check compose deploy/compose.yaml

echo "== metric names, against a real scrape"
# shellcheck source=scripts/fleet-lib.sh
source scripts/fleet-lib.sh
trap test_fleet_down EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
metrics_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export TASKFLEET_METRICS_ADDR="127.0.0.1:$metrics_port"
test_fleet_up "$bin" deploycheck "$work/fleet"
check traffic "$TASKFLEET_API_URL"
python3 - "$TASKFLEET_API_URL/metrics" "$work/scheduler.prom" \
  "http://$TASKFLEET_METRICS_ADDR/metrics" "$work/worker.prom" <<'PY'
import sys, urllib.request
for url, path in zip(sys.argv[1::2], sys.argv[2::2]):
    with urllib.request.urlopen(url, timeout=10) as answer, open(path, "wb") as file:
        file.write(answer.read())
PY
check metric-names "$work/scheduler.prom" "$work/worker.prom" \
  --queries deploy/grafana/taskfleet.json deploy/prometheus/alerts.yml
echo "== deploy files checked"
