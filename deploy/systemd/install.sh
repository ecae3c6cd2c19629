#!/usr/bin/env bash
# deploy/systemd/install.sh: installs the dispatcher as a system service (single node, SQLite),
# or host-agent as the current user's service.
#
#   sudo deploy/systemd/install.sh dispatcher [--binary PATH]     # system-wide, as root
#   deploy/systemd/install.sh host-agent [--binary PATH]          # for the current user
#   sudo deploy/systemd/install.sh dispatcher --uninstall
#   deploy/systemd/install.sh host-agent --uninstall
#
# --binary defaults to target/release/<name> (cargo build --release -p <name>). Settings files
# are written once and never overwritten: /etc/dispatcher/dispatcher.env, or
# ~/.config/host-agent/host-agent.env. --uninstall stops and disables the service and removes
# the unit and the binary, and keeps the settings and the data (/var/lib/dispatcher, the
# agent's ~/.fusion-host credentials): remove those by hand if you mean to.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

what=${1:-}
shift || true
uninstall=0
binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --uninstall) uninstall=1 ;;
    --binary) binary=${2:?--binary needs a path}; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '==> %s\n' "$*"; }

install_dispatcher() {
  [ "$(id -u)" -eq 0 ] || { echo "install.sh dispatcher: run as root (sudo)" >&2; exit 1; }
  binary=${binary:-$root/target/release/dispatcher}
  [ -x "$binary" ] || { echo "no binary at $binary: cargo build --release -p dispatcher, or --binary PATH" >&2; exit 1; }
  if ! id dispatcher >/dev/null 2>&1; then
    say "creating system user dispatcher"
    useradd --system --home-dir /var/lib/dispatcher --shell /usr/sbin/nologin dispatcher
  fi
  install -D -m 0755 "$binary" /usr/local/bin/dispatcher
  install -d -m 0750 -o root -g dispatcher /etc/dispatcher
  if [ ! -e /etc/dispatcher/dispatcher.env ]; then
    install -m 0640 -o root -g dispatcher "$here/dispatcher.env" /etc/dispatcher/dispatcher.env
    say "wrote /etc/dispatcher/dispatcher.env"
  else
    say "kept /etc/dispatcher/dispatcher.env"
  fi
  install -D -m 0644 "$root/README.md" /usr/local/share/doc/dispatcher/README.md
  install -m 0644 "$here/dispatcher.service" /etc/systemd/system/dispatcher.service
  systemctl daemon-reload
  systemctl enable --now dispatcher.service
  say "dispatcher running: systemctl status dispatcher; journalctl -u dispatcher"
  say "an api token: sudo -u dispatcher dispatcher token create --user <you> --database-url 'sqlite:///var/lib/dispatcher/dispatcher.db?mode=rwc'"
}

uninstall_dispatcher() {
  [ "$(id -u)" -eq 0 ] || { echo "install.sh dispatcher --uninstall: run as root (sudo)" >&2; exit 1; }
  systemctl disable --now dispatcher.service 2>/dev/null || true
  rm -f /etc/systemd/system/dispatcher.service /usr/local/bin/dispatcher
  rm -rf /usr/local/share/doc/dispatcher
  systemctl daemon-reload
  say "removed the service and the binary; kept /etc/dispatcher and /var/lib/dispatcher"
}

install_agent() {
  [ "$(id -u)" -ne 0 ] || { echo "install.sh host-agent: run as the user the agent works for, not root" >&2; exit 1; }
  binary=${binary:-$root/target/release/host-agent}
  [ -x "$binary" ] || { echo "no binary at $binary: cargo build --release -p host-agent, or --binary PATH" >&2; exit 1; }
  local config=${XDG_CONFIG_HOME:-$HOME/.config}
  install -D -m 0755 "$binary" "$HOME/.local/bin/host-agent"
  install -d -m 0700 "$config/host-agent"
  if [ ! -e "$config/host-agent/host-agent.env" ]; then
    sed "s#@HOME@#$HOME#g" "$here/host-agent.env" >"$config/host-agent/host-agent.env"
    chmod 0600 "$config/host-agent/host-agent.env"
    say "wrote $config/host-agent/host-agent.env: set PULSN_URL and FUSION_HOST_ROOTS"
  else
    say "kept $config/host-agent/host-agent.env"
  fi
  install -D -m 0644 "$here/host-agent.service" "$config/systemd/user/host-agent.service"
  systemctl --user daemon-reload
  systemctl --user enable host-agent.service
  say "enroll once: $HOME/.local/bin/host-agent run --server <URL> --code <CODE> (Ctrl-C when connected)"
  say "then: systemctl --user start host-agent; to run without a login session: loginctl enable-linger $USER"
}

uninstall_agent() {
  local config=${XDG_CONFIG_HOME:-$HOME/.config}
  systemctl --user disable --now host-agent.service 2>/dev/null || true
  rm -f "$config/systemd/user/host-agent.service" "$HOME/.local/bin/host-agent"
  systemctl --user daemon-reload 2>/dev/null || true
  say "removed the service and the binary; kept $config/host-agent and the credentials in ~/.fusion-host"
}

case "$what:$uninstall" in
  dispatcher:0) install_dispatcher ;;
  dispatcher:1) uninstall_dispatcher ;;
  host-agent:0) install_agent ;;
  host-agent:1) uninstall_agent ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
