#!/usr/bin/env bash
# deploy/ci/check.sh: validates what deploy/ ships, as CI does (tests/tests/deploy.rs runs it).
#
#   1. kubectl kustomize     renders both overlays, the monitoring and the examples
#   2. kubernetes-validate   the rendered objects against the Kubernetes schemas (--strict)
#   3. checkov               policy scan of the rendered objects; every skipped check carries
#                            its reason in an annotation and in deploy/CHECKOV.md
#   4. hadolint              deploy/Dockerfile
#   5. promtool              the alert rules
#   6. nats-server -t        the NATS configuration, with its variables set
#   7. check_manifests.py    what no schema knows: the timing numbers agree with each other and
#                            with the longest call, pod security, no secret in a manifest, the
#                            PrometheusRule carries the rules file, the dashboard parses
#
# Usage: deploy/ci/check.sh [DEPLOY_DIR]   (default: the deploy/ this script is in)
# Tools: from deploy/ci/.venv/bin (scripts/test.sh makes it; DEPLOY_TOOLS_BIN overrides), else
# PATH. Exits non-zero at the first step that fails, naming it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
deploy=$(cd "${1:-$here/..}" && pwd)
bin=${DEPLOY_TOOLS_BIN:-$here/.venv/bin}

tool() {
  if [ -x "$bin/$1" ]; then
    echo "$bin/$1"
  elif command -v "$1" >/dev/null 2>&1; then
    command -v "$1"
  else
    echo "check: $1 is not installed (scripts/test.sh installs it)" >&2
    exit 3
  fi
}
step() { printf '==> %s\n' "$*"; }
fail() {
  printf 'FAILED step: %s\n' "$1" >&2
  exit 1
}

kubectl=$(tool kubectl)
validate=$(tool kubernetes-validate)
checkov=$(tool checkov)
hadolint=$(tool hadolint)
promtool=$(tool promtool)
nats=$(tool nats-server)
python=$(tool python3)
[ -x "$bin/python3" ] && python="$bin/python3"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

step "kubectl kustomize"
for dir in overlays/bundled-postgres overlays/managed-postgres monitoring examples; do
  name=$(echo "$dir" | tr / -)
  "$kubectl" kustomize "$deploy/k8s/$dir" >"$out/$name.yaml" || fail "kubectl kustomize $dir"
  echo "    $dir: $(grep -c '^kind:' "$out/$name.yaml") objects"
done

step "kubernetes-validate --strict"
# The monitoring objects and the HTTPRoute are custom resources without a schema there: they
# are warned about, not failed; the rest must pass.
"$validate" --strict --quiet "$out"/overlays-*.yaml "$out/examples.yaml" "$out/monitoring.yaml" \
  || fail "kubernetes-validate"

step "checkov (kubernetes)"
"$checkov" -d "$out" --framework kubernetes --compact --quiet --skip-download \
  || fail "checkov"

step "hadolint deploy/Dockerfile"
"$hadolint" "$deploy/Dockerfile" || fail "hadolint"

step "promtool check rules"
"$promtool" check rules "$deploy/k8s/monitoring/alerts.rules.yml" || fail "promtool"

step "nats-server -t (the NATS configuration)"
sed "s#/var/run/nats/nats.pid#$out/nats.pid#" "$deploy/k8s/base/nats.conf" >"$out/nats.conf"
POD_NAME=nats-0 DISPATCHER_NATS_PASSWORD=check "$nats" -t -c "$out/nats.conf" || fail "nats-server -t"

step "check_manifests.py"
"$python" "$here/check_manifests.py" "$deploy" "$out" || fail "check_manifests.py"

echo "deploy checks passed"
