#!/usr/bin/env bash
# Removes what scripts/install.sh installed (run as root; idempotent).
#
#   scripts/uninstall.sh [--purge] [--dry-run]
#
# Stops and disables cluster.service, removes the unit and /usr/local/bin/cluster. The
# node's data (/var/lib/cluster: its Raft log and releases) and /etc/cluster (node.toml and
# the node's credentials in /etc/cluster/tls) stay, so a reinstall rejoins with its state;
# --purge removes them and the `cluster` user too.
# Remove a node from the cluster's membership first if it is not coming back.
# --dry-run prints every step and changes nothing.
set -euo pipefail

fail() { echo "uninstall.sh: $*" >&2; exit 2; }
purge=0 dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --purge) purge=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) fail "unknown argument: $1 (see --help)" ;;
  esac
done
if [ "$dry" = 0 ]; then
  [ "$(id -u)" = 0 ] || fail "run as root (sudo scripts/uninstall.sh ...), or add --dry-run to see the steps"
fi

step() {
  local what=$1; shift
  if [ "$dry" = 1 ]; then echo "would $what: $*"; else echo "$what"; "$@"; fi
}
unit=/etc/systemd/system/cluster.service
if command -v systemctl >/dev/null && [ -e "$unit" ]; then
  step "stop and disable the node" systemctl disable --now --quiet cluster.service
fi
if [ -e "$unit" ]; then
  step "remove the unit" rm -f "$unit"
  command -v systemctl >/dev/null && step "reload systemd" systemctl daemon-reload
fi
[ -e /usr/local/bin/cluster ] && step "remove the stable binary" rm -f /usr/local/bin/cluster
if [ "$purge" = 1 ]; then
  [ -e /var/lib/cluster ] && step "remove the node's data" rm -rf /var/lib/cluster
  [ -e /etc/cluster/tls ] && step "remove the node's credentials /etc/cluster/tls" rm -rf /etc/cluster/tls
  [ -e /etc/cluster ] && step "remove the configuration" rm -rf /etc/cluster
  if getent passwd cluster >/dev/null; then
    step "remove the user cluster" userdel cluster
  fi
else
  echo "kept /var/lib/cluster and /etc/cluster, with the node's credentials (--purge removes them)"
fi
echo "uninstalled"
