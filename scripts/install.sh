#!/usr/bin/env bash
# Installs a cluster node on this host, run under systemd (run as root; idempotent).
#
#   scripts/install.sh --dist <dir> --id <n> --listen <host:port> (--bootstrap | --join <host:port>[,<host:port>...])
#       (--tls <dir> | --insecure) [--advertise <host:port>] [--health-command <cmd>]
#       [--heartbeat-ms <n>] [--election-timeout-ms <n>] [--release-key <file>]...
#       [--no-start] [--dry-run]
#
# Creates the `cluster` system user, /var/lib/cluster and /etc/cluster; installs the dist
# (a directory made by scripts/build-dist.sh) as the node's first release; installs its
# binary as the stable /usr/local/bin/cluster (the boot guard and the CLI); copies the
# node's credentials to /etc/cluster/tls; writes /etc/cluster/node.toml from the flags;
# installs, enables and starts systemd/cluster.service.
#
# --tls <dir> is this host's credentials directory: ca.pem, cert.pem and key.pem, as
# `cluster tls issue <dir> --ca <ca-dir> --node <n>` made them for node <n> (the CA's own
# key, ca.key, stays where it was made). They are copied to /etc/cluster/tls (0750,
# root:cluster; key.pem 0640, readable by the service user) and node.toml says
# tls = "/etc/cluster/tls". --insecure instead runs the node plaintext with nobody
# authenticated (insecure = true): only for a throwaway cluster on a trusted network.
#
# Each --release-key (a release.pub from `cluster dist keygen`) is copied to
# /etc/cluster/release-key-<n>.pub and listed in release_keys: the node then runs only
# releases signed with one of them (`cluster dist stamp <dist> --sign <release.key>`).
#
# Running it again changes only what differs. A host that already has a release keeps it:
# later releases are rolled out with `cluster update`. --dry-run prints every step and
# changes nothing. --no-start installs and enables the unit without starting it.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
fail() { echo "install.sh: $*" >&2; exit 2; }

data_dir=/var/lib/cluster
config_dir=/etc/cluster
config=$config_dir/node.toml
tls_dir=$config_dir/tls
stable=/usr/local/bin/cluster
unit_dir=/etc/systemd/system
unit_src=$(cd "$(dirname "$0")/.." && pwd)/systemd/cluster.service
user=cluster

dist='' id='' listen='' join='' bootstrap=0 advertise='' health='' heartbeat='' election=''
tls='' insecure=0 start=1 dry=0
release_keys=()
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || fail "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dist) need_value "$@"; dist=$2; shift 2 ;;
    --id) need_value "$@"; id=$2; shift 2 ;;
    --listen) need_value "$@"; listen=$2; shift 2 ;;
    --join) need_value "$@"; join=$2; shift 2 ;;
    --bootstrap) bootstrap=1; shift ;;
    --advertise) need_value "$@"; advertise=$2; shift 2 ;;
    --tls) need_value "$@"; tls=$2; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --health-command) need_value "$@"; health=$2; shift 2 ;;
    --heartbeat-ms) need_value "$@"; heartbeat=$2; shift 2 ;;
    --election-timeout-ms) need_value "$@"; election=$2; shift 2 ;;
    --release-key) need_value "$@"; release_keys+=("$2"); shift 2 ;;
    --no-start) start=0; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown argument: $1 (see --help)" ;;
  esac
done

# Every check before any change: a bad flag leaves the host as it was.
[ -n "$dist" ] || fail "--dist <dir> is required: a dist made by scripts/build-dist.sh"
[ -x "$dist/bin/cluster" ] || fail "$dist/bin/cluster is missing or not executable: build the dist with scripts/build-dist.sh"
[ -n "$id" ] || fail "--id <n> is required: a unique number per host, never reused"
[[ "$id" =~ ^[1-9][0-9]{0,18}$ ]] || fail "--id must be a positive whole number, not '$id'"
[ -n "$listen" ] || fail "--listen <host:port> is required, e.g. --listen 10.0.0.1:7100"
host_port='^([0-9A-Za-z.-]+|\[[0-9a-fA-F:]+\]):[0-9]{1,5}$'
[[ "$listen" =~ ^([0-9.]+|\[[0-9a-fA-F:]+\]):[0-9]{1,5}$ ]] || fail "--listen must be an IP address and port, e.g. 10.0.0.1:7100, not '$listen'"
[ "${listen##*:}" -ge 1 ] && [ "${listen##*:}" -le 65535 ] || fail "--listen needs a port from 1 to 65535 (a host's address is part of the membership), not '$listen'"
if [ "$bootstrap" = 1 ] && [ -n "$join" ]; then
  fail "--bootstrap and --join exclude each other: bootstrap the first host, join the others"
fi
[ "$bootstrap" = 1 ] || [ -n "$join" ] || fail "give --bootstrap (the first host) or --join <host:port> (any member)"
if [ -n "$join" ]; then
  IFS=',' read -ra join_addrs <<<"$join"
  for addr in "${join_addrs[@]}"; do
    [[ "$addr" =~ $host_port ]] || fail "--join must be host:port of a member, or several separated by commas, not '$join'"
  done
fi
[ -z "$advertise" ] || [[ "$advertise" =~ $host_port ]] || fail "--advertise must be host:port, not '$advertise'"
case "$listen" in
  0.0.0.0:*|\[::\]:*) [ -n "$advertise" ] || fail "listening on $listen needs --advertise <host:port>: the address other hosts reach this one at" ;;
esac
for pair in "heartbeat-ms:$heartbeat" "election-timeout-ms:$election"; do
  value=${pair#*:}
  [ -z "$value" ] || [[ "$value" =~ ^[1-9][0-9]{0,8}$ ]] || fail "--${pair%%:*} must be a positive number of milliseconds, not '$value'"
done
for key in ${release_keys[@]+"${release_keys[@]}"}; do
  [ -f "$key" ] || fail "--release-key $key does not exist: give a release.pub made by cluster dist keygen"
  if grep -q "PRIVATE KEY" "$key"; then
    fail "--release-key $key is a private key: give nodes the public half (release.pub) and keep release.key off them"
  fi
  grep -q "BEGIN PUBLIC KEY" "$key" || fail "--release-key $key is not a PEM public key: give a release.pub made by cluster dist keygen"
done
# The identity a PEM certificate names: its cluster:// URI subject alternative name, read
# out of the DER (tag 0x86, a one-byte length, the string) so the host needs no openssl.
cert_identity() {
  local hex text
  hex=$(sed '/^-----/d' "$1" | base64 -d 2>/dev/null | od -An -v -tx1 | tr -d ' \n') || return 0
  # 636c75737465723a2f2f is "cluster://".
  [[ "$hex" =~ 86([0-7][0-9a-f])(636c75737465723a2f2f[0-9a-f]*) ]] || return 0
  text=${BASH_REMATCH[2]:0:$((16#${BASH_REMATCH[1]} * 2))}
  printf "$(sed 's/../\\x&/g' <<<"$text")"
}
if [ -n "$tls" ] && [ "$insecure" = 1 ]; then
  fail "--tls and --insecure exclude each other: give this host's credentials with --tls"
fi
[ -n "$tls" ] || [ "$insecure" = 1 ] ||
  fail "--tls <dir> is required: this host's credentials, made with \`cluster tls issue <dir> --ca <ca-dir> --node ${id}\` (or --insecure to run without authentication, not for production)"
if [ -n "$tls" ]; then
  [ -d "$tls" ] || fail "--tls $tls is not a directory: give the directory \`cluster tls issue <dir> --ca <ca-dir> --node $id\` made"
  for file in ca.pem cert.pem key.pem; do
    [ -f "$tls/$file" ] && [ -r "$tls/$file" ] ||
      fail "$tls/$file is missing or unreadable: a credentials directory holds ca.pem, cert.pem and key.pem, as \`cluster tls issue <dir> --ca <ca-dir> --node $id\` writes them"
  done
  grep -q -- '-----BEGIN CERTIFICATE-----' "$tls/ca.pem" || fail "$tls/ca.pem holds no PEM certificate (the cluster CA's ca.pem)"
  grep -q -- '-----BEGIN CERTIFICATE-----' "$tls/cert.pem" || fail "$tls/cert.pem holds no PEM certificate"
  grep -q -- '-----BEGIN .*PRIVATE KEY-----' "$tls/key.pem" || fail "$tls/key.pem holds no PEM private key"
  found=$(cert_identity "$tls/cert.pem")
  [ "$found" = "cluster://node/$id" ] ||
    fail "$tls/cert.pem is for ${found:-no cluster identity}, and this is node $id: give --tls the directory \`cluster tls issue <dir> --ca <ca-dir> --node $id\` made"
fi
[ -f "$unit_src" ] || fail "$unit_src is missing: run install.sh from a checkout (it installs systemd/cluster.service)"
"$dist/bin/cluster" dist verify "$dist" >/dev/null || fail "$dist does not match its version.json: rebuild it with scripts/build-dist.sh"
if [ "$dry" = 0 ]; then
  [ "$(id -u)" = 0 ] || fail "run as root (sudo scripts/install.sh ...), or add --dry-run to see the steps"
  command -v systemctl >/dev/null || fail "systemctl not found: this host does not run systemd (use cluster supervise instead)"
fi

if [ "$insecure" = 1 ]; then
  echo "install.sh: WARNING: --insecure: node $id will speak plaintext and authenticate nobody:" \
    "anyone who can reach $listen can run code on every node. Use --tls <dir> outside a throwaway cluster on a trusted network." >&2
fi

toml_string() { # a TOML basic string
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}
node_toml() {
  echo "# Written by scripts/install.sh; the unit runs: cluster node run --config $config"
  echo "id = $id"
  echo "listen = $(toml_string "$listen")"
  [ -z "$advertise" ] || echo "advertise = $(toml_string "$advertise")"
  echo "data_dir = $(toml_string "$data_dir")"
  if [ "$bootstrap" = 1 ]; then echo "bootstrap = true"; else echo "join = $(toml_string "$join")"; fi
  [ -z "$heartbeat" ] || echo "heartbeat_ms = $heartbeat"
  [ -z "$election" ] || echo "election_timeout_ms = $election"
  [ -z "$health" ] || echo "health_command = $(toml_string "$health")"
  if [ ${#release_keys[@]} -gt 0 ]; then
    local n list=''
    for n in $(seq 1 ${#release_keys[@]}); do
      list="$list${list:+, }$(toml_string "$config_dir/release-key-$n.pub")"
    done
    echo "release_keys = [$list]"
  fi
  if [ -n "$tls" ]; then echo "tls = $(toml_string "$tls_dir")"; else echo "insecure = true"; fi
}

step() { # step <description> <command...>: runs it, or only says it in a dry run
  local what=$1; shift
  if [ "$dry" = 1 ]; then echo "would $what: $*"; else echo "$what"; "$@"; fi
}
# Writes stdin to <path> with <mode>, atomically, unless it already holds exactly that.
put_file() {
  local path=$1 mode=$2 content
  content=$(cat)
  if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then
    echo "$path is up to date"
    return
  fi
  if [ "$dry" = 1 ]; then
    echo "would write $path (mode $mode):"
    printf '%s\n' "$content" | sed 's/^/    /'
    return
  fi
  printf '%s\n' "$content" >"$path.tmp.$$"
  chmod "$mode" "$path.tmp.$$"
  mv -f "$path.tmp.$$" "$path"
  echo "wrote $path"
  changed=1
}
# Copies <src> to <path> as root:$user with <mode>, atomically, unless it already is that.
put_copy() {
  local src=$1 path=$2 mode=$3
  if [ -f "$path" ] && cmp -s "$src" "$path" && [ "$(stat -c '%a %U:%G' "$path")" = "${mode#0} root:$user" ]; then
    echo "$path is up to date"
    return
  fi
  if [ "$dry" = 1 ]; then
    echo "would copy $src to $path (mode $mode, root:$user)"
    return
  fi
  install -m "$mode" -o root -g "$user" "$src" "$path.tmp.$$"
  mv -f "$path.tmp.$$" "$path"
  echo "wrote $path (mode $mode, root:$user)"
  changed=1
}
# What the running node would not see until it restarts.
changed=0

if getent passwd "$user" >/dev/null; then
  echo "user $user exists"
else
  step "create the system user $user" useradd --system --user-group --home-dir "$data_dir" \
    --no-create-home --shell /usr/sbin/nologin "$user"
fi
step "create $data_dir" install -d -m 0750 "$data_dir"
step "make $data_dir the service user's" chown "$user:$user" "$data_dir"
step "create $config_dir" install -d -m 0755 "$config_dir"

if [ -n "$tls" ]; then
  # The service user reads its key through the group; nobody else can.
  if [ -d "$tls_dir" ] && [ "$(stat -c '%a %U:%G' "$tls_dir")" = "750 root:$user" ]; then
    echo "$tls_dir is up to date"
  else
    step "create $tls_dir (mode 0750, root:$user)" install -d -m 0750 -o root -g "$user" "$tls_dir"
  fi
  put_copy "$tls/ca.pem" "$tls_dir/ca.pem" 0644
  put_copy "$tls/cert.pem" "$tls_dir/cert.pem" 0644
  put_copy "$tls/key.pem" "$tls_dir/key.pem" 0640
elif [ -d "$tls_dir" ]; then
  echo "kept $tls_dir (unused with --insecure)"
fi

if cmp -s "$dist/bin/cluster" "$stable"; then
  echo "$stable is up to date"
else
  step "install the stable binary (boot guard, CLI) as $stable" install -m 0755 "$dist/bin/cluster" "$stable"
fi

if [ -L "$data_dir/current" ]; then
  echo "$data_dir already runs release $(basename "$(readlink "$data_dir/current")"): roll out new releases with cluster update"
else
  step "install $dist as the first release" "$dist/bin/cluster" dist install "$dist" --data-dir "$data_dir"
  step "make the release the service user's" chown -R "$user:$user" "$data_dir"
fi

n=0
for key in ${release_keys[@]+"${release_keys[@]}"}; do
  n=$((n + 1))
  put_file "$config_dir/release-key-$n.pub" 0644 <"$key"
done
node_toml | put_file "$config" 0644

if cmp -s "$unit_src" "$unit_dir/cluster.service"; then
  echo "$unit_dir/cluster.service is up to date"
else
  step "install the unit" install -m 0644 "$unit_src" "$unit_dir/cluster.service"
  step "reload systemd" systemctl daemon-reload
fi
step "enable the unit" systemctl enable --quiet cluster.service
if [ "$start" = 1 ]; then
  if [ "$changed" = 1 ] && [ "$dry" = 0 ] && systemctl is-active --quiet cluster.service; then
    echo "the running node keeps its old configuration or credentials until it restarts: systemctl restart cluster.service"
  fi
  step "start the node" systemctl start cluster.service
else
  echo "not starting the node (--no-start): systemctl start cluster.service"
fi
