#!/usr/bin/env bash
# deploy/k8s/create-secrets.sh: creates the Secrets the manifests refer to, with random
# passwords, in namespace pulsn (or $NAMESPACE). Nothing secret is ever in a manifest.
#
#   deploy/k8s/create-secrets.sh bundled                  # the in-cluster PostgreSQL of overlays/bundled-postgres
#   deploy/k8s/create-secrets.sh managed 'postgres://app:…@db.example.com:5432/app?sslmode=verify-full&sslrootcert=/etc/dispatcher/database-ca/ca.pem' ca.pem
#
# Secrets made:
#   nats-credentials      dispatcher-password: the dispatcher's NATS password (also read by the NATS servers)
#   dispatcher-database   url: the DATABASE_URL of the replicas and the migrate Job
#   postgres-credentials  password: the bundled PostgreSQL's (bundled only)
#   database-ca           ca.pem: the CA of a managed PostgreSQL (managed only, when given)
# Secrets that exist are left as they are (delete one to make it again), so running this twice
# never changes a password under a running database.
set -euo pipefail
namespace=${NAMESPACE:-pulsn}
mode=${1:-}
case "$mode" in
  bundled | managed) ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

random() { head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }
exists() { kubectl -n "$namespace" get secret "$1" >/dev/null 2>&1; }
create() {
  local name=$1
  shift
  if exists "$name"; then
    echo "secret/$name exists: kept"
  else
    kubectl -n "$namespace" create secret generic "$name" "$@"
  fi
}

kubectl get namespace "$namespace" >/dev/null 2>&1 || kubectl create namespace "$namespace"
create nats-credentials --from-literal=dispatcher-password="$(random)"
if [ "$mode" = bundled ]; then
  if exists postgres-credentials; then
    password=$(kubectl -n "$namespace" get secret postgres-credentials -o jsonpath='{.data.password}' | base64 -d)
  else
    password=$(random)
  fi
  create postgres-credentials --from-literal=password="$password"
  create dispatcher-database \
    --from-literal=url="postgres://dispatcher:${password}@postgres:5432/dispatcher?sslmode=disable"
else
  url=${2:?the managed database URL}
  create dispatcher-database --from-literal=url="$url"
  if [ -n "${3:-}" ]; then
    create database-ca --from-file=ca.pem="$3"
  fi
fi
