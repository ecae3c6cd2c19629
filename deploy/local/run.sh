#!/usr/bin/env bash
# deploy/local/run.sh: one command for a local multi-replica cluster on a laptop.
#
# Builds dispatcher, host-agent and the local-cluster tool, checks that nats-server and a
# PostgreSQL server are there, then runs local-cluster: a nats-server (or a NATS cluster), a
# fresh database, three dispatcher replicas on free ports. It prints the URLs, pids, an api
# token, a pairing code and example commands, and runs until Ctrl-C (then stops everything and
# drops the database unless --keep).
#
# Usage: deploy/local/run.sh [--release] [--replicas N] [--nats-nodes N] [--keep] [--respawn]
#                            [--keepalive-secs S] [--broker-grace-secs S] [--log FILTER]
# Environment: PG_URL (default postgres://postgres@127.0.0.1:5432), the server the database is
# created on; LOCAL_CLUSTER_DATABASE_URL to use an existing database instead.
# See deploy/local/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=debug
build_flags=()
args=()
for arg in "$@"; do
  case "$arg" in
    --release) profile=release; build_flags+=(--release) ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done

if ! command -v nats-server >/dev/null 2>&1; then
  echo "error: nats-server is not on PATH." >&2
  echo "  Install it: https://docs.nats.io/running-a-nats-service/introduction/installation" >&2
  echo "  (Debian/Ubuntu: apt-get install nats-server; macOS: brew install nats-server)" >&2
  exit 1
fi

pg_url="${PG_URL:-postgres://postgres@127.0.0.1:5432}"
if [ -z "${LOCAL_CLUSTER_DATABASE_URL:-}" ]; then
  hostport="${pg_url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
  host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$hostport" ] && port=5432
  if ! (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
    echo "error: no PostgreSQL server accepts connections on $host:$port." >&2
    echo "  Start one (e.g. docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16)" >&2
    echo "  or point PG_URL at yours: PG_URL=postgres://user:password@host:5432 $0" >&2
    exit 1
  fi
fi

echo "==> cargo build ${build_flags[*]:-} -p dispatcher -p host-agent -p e2e --bin local-cluster" >&2
cargo build ${build_flags[@]+"${build_flags[@]}"} -p dispatcher -p host-agent -p e2e --bin local-cluster

target="${CARGO_TARGET_DIR:-target}"
exec "$target/$profile/local-cluster" ${args[@]+"${args[@]}"}
