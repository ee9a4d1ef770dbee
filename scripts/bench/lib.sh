# Shared helpers of scripts/bench.sh and the scripts under scripts/bench/ (sourced).
#
# Expects: $bin (the release `cluster`), $work (a temp dir), $runs. Every process started
# through `spawn` runs in its own process group, and `bench_cleanup` (the EXIT trap) stops
# every such group: SIGTERM, up to 10 s for a graceful exit, then SIGKILL.
#
# Clusters run with mutual TLS, as in production: `cluster local up` makes its own CA and
# certificates, and `nodes_up DIR N tls` does the same; `nodes_up DIR N insecure` is the
# plaintext reference. `use_client DIR` points the clients (cluster_status, the `cluster`
# commands given "${client_flags[@]}", kv_writer, rollout_timeline) at one of them.

groups=()
# Single processes (not groups) to stop on exit.
pids=()

# install_missing COMMAND=PACKAGE...: installs (apt-get) the Debian packages whose command
# is missing.
install_missing() {
  local need=() pair
  for pair in "$@"; do command -v "${pair%%=*}" >/dev/null || need+=("${pair#*=}"); done
  [ ${#need[@]} -gt 0 ] || return 0
  echo "installing ${need[*]} (apt-get)..." >&2
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
}

# release_build ROOT [CARGO ARGS...]: `cargo build --release` of the checkout at ROOT;
# sets target_dir.
release_build() {
  local root=$1; shift
  cargo build --quiet --release --locked --manifest-path "$root/Cargo.toml" "$@"
  target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
}

# spawn LOG COMMAND...: runs COMMAND in the background in a new process group (session);
# sets spawned_pid (also the group id).
spawn() {
  local log=$1; shift
  setsid "$@" >"$log" 2>&1 </dev/null &
  spawned_pid=$!
  groups+=("$spawned_pid")
}

# stop_group PID: SIGTERM to the group, wait up to 10 s, then SIGKILL.
stop_group() {
  local pgid=$1 deadline=$(( $(date +%s) + 10 ))
  kill -TERM -- "-$pgid" 2>/dev/null || true
  while kill -0 -- "-$pgid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
  kill -KILL -- "-$pgid" 2>/dev/null || true
  wait "$pgid" 2>/dev/null || true
  local kept=() g
  for g in "${groups[@]}"; do [ "$g" = "$pgid" ] || kept+=("$g"); done
  groups=("${kept[@]}")
}

bench_cleanup() {
  local g p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  for g in "${groups[@]}"; do stop_group "$g"; done
}

now_ns() { date +%s%N; }
ms_since() { echo $(( ($(now_ns) - $1) / 1000000 )); }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
say() { echo "[$(date +%T)] $*" >&2; }

# free_port: a loopback TCP port nothing listens on now (for programs that cannot take port
# 0; the caller retries if it is taken in between).
free_port() {
  local port
  while :; do
    port=$(( 20000 + RANDOM % 40000 ))
    ss -Htln "sport = :$port" | grep -q . || { echo "$port"; return; }
  done
}

# make_dist DIR LABEL: a dist with this `cluster` binary and a label file, signed with the
# clients' cluster's release key when it has one (its nodes accept nothing else); prints
# its hash.
make_dist() { # make_dist DIR LABEL [MIB]: MIB of fresh random bytes in share/payload too
  mkdir -p "$1/bin" "$1/share"
  cp "$bin" "$1/bin/cluster"
  chmod 755 "$1/bin/cluster"
  echo "$2" >"$1/share/label"
  [ -z "${3:-}" ] || head -c $(( $3 * 1024 * 1024 )) /dev/urandom >"$1/share/payload"
  "$bin" dist stamp "$1" ${sign_key:+--sign "$sign_key"} | tail -n 1
}

# Extra flags of every `cluster` client command: (--insecure) for a plaintext cluster.
client_flags=()
# The release key of the clients' cluster (`cluster local up` makes DIR/keys/release.key).
sign_key=

# use_client DIR: the cluster under DIR is the one client commands talk to from here on:
# as its operator (CLUSTER_TLS=DIR/tls/operator) when it has one, else plaintext.
use_client() {
  sign_key=
  [ -f "$1/keys/release.key" ] && sign_key=$1/keys/release.key
  if [ -d "$1/tls/operator" ]; then
    export CLUSTER_TLS=$1/tls/operator
    client_flags=()
  else
    unset CLUSTER_TLS
    client_flags=(--insecure)
  fi
}

# local_up DIR N [ARG...]: starts N supervised nodes (`cluster local up ARG...`, mutual TLS
# with a CA of its own under DIR/tls) with data under DIR; waits until they form a cluster;
# sets up_pid and addrs (comma-separated) and makes it the clients' cluster (use_client).
local_up() {
  local dir=$1 n=$2 deadline=$(( $(date +%s) + 120 + $2 ))
  shift 2
  mkdir -p "$dir"
  : >"$dir.log"
  spawn "$dir.log" "$bin" local up -n "$n" --dir "$dir" "$@"
  up_pid=$spawned_pid
  until grep -q '^export CLUSTER_NODE=' "$dir.log"; do
    if ! kill -0 "$up_pid" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
      echo "a local cluster of $n did not start; its log:" >&2; cat "$dir.log" >&2; exit 1
    fi
    sleep 0.1
  done
  addrs=$(sed -n 's/^node [0-9]*: \([0-9.:]*\) .*/\1/p' "$dir.log" | paste -sd,)
  use_client "$dir"
}

# nodes_up DIR N SECURITY [FLAG...]: starts N unsupervised nodes (`cluster node run`: node 1
# bootstraps, the others join it; default timing unless FLAGs say otherwise, which every
# node gets) with data under DIR. SECURITY tls: a CA
# of its own under DIR/tls, a certificate per node (`--tls`) and an operator's for the
# clients; insecure: `--insecure` nodes, plaintext clients. Waits until N voters follow one
# leader; sets addrs and up_groups (the nodes' process groups) and makes it the clients'
# cluster (use_client).
nodes_up() {
  local dir=$1 n=$2 security=$3 id first='' flags deadline
  shift 3
  mkdir -p "$dir"
  up_groups=()
  if [ "$security" = tls ]; then
    "$bin" tls init "$dir/tls/ca" >/dev/null
    for id in $(seq 1 "$n"); do
      "$bin" tls issue "$dir/tls/n$id" --ca "$dir/tls/ca" --node "$id" >/dev/null
    done
    "$bin" tls issue "$dir/tls/operator" --ca "$dir/tls/ca" --operator bench >/dev/null
  fi
  for id in $(seq 1 "$n"); do
    if [ "$security" = tls ]; then flags=(--tls "$dir/tls/n$id"); else flags=(--insecure); fi
    if [ -z "$first" ]; then flags+=(--bootstrap); else flags+=(--join "$first"); fi
    spawn "$dir/n$id.log" "$bin" node run --id "$id" --listen 127.0.0.1:0 --data-dir "$dir/n$id" "${flags[@]}" "$@"
    up_groups+=("$spawned_pid")
    deadline=$(( $(date +%s) + 30 ))
    until [ -s "$dir/n$id/node.addr" ]; do
      if ! kill -0 "$spawned_pid" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
        echo "node $id ($security) did not start; its log:" >&2; cat "$dir/n$id.log" >&2; exit 1
      fi
      sleep 0.05
    done
    [ -n "$first" ] || first=$(cat "$dir/n1/node.addr")
  done
  addrs=$(current_addrs "$dir" "$n")
  use_client "$dir"
  deadline=$(( $(date +%s) + 60 ))
  until cluster_status "$addrs" | jq -e --argjson n "$n" \
      '.leader != null and ([.nodes[] | select(.role == "voter"
        and (.state == "leader" or .state == "follower"))] | length) == $n' >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "$n $security nodes did not form a cluster within 60 s:" >&2; cluster_status "$addrs" >&2 || true; exit 1
    fi
    sleep 0.1
  done
}

# current_addrs DIR N: the nodes' addresses now (a restarted node listens on a new port).
current_addrs() {
  local id out=()
  for id in $(seq 1 "$2"); do out+=("$(cat "$1/n$id/node.addr")"); done
  (IFS=,; echo "${out[*]}")
}

# cluster_status ADDRS: `status --json` from the first node that answers.
cluster_status() {
  local addr
  for addr in ${1//,/ }; do
    "$bin" status --json --node "$addr" "${client_flags[@]}" 2>/dev/null && return 0
  done
  return 1
}

# wait_healthy ADDRS N HASH: until a leader and N members (voters and learners), every one
# on HASH and following it.
wait_healthy() {
  local deadline=$(( $(date +%s) + 60 ))
  until cluster_status "$1" | jq -e --argjson n "$2" --arg h "$3" \
      '.leader != null and ([.nodes[] | select(.build_hash == $h and
        ((.role == "voter" and (.state == "leader" or .state == "follower"))
         or (.role == "learner" and .state == "learner")))] | length) == $n' >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "cluster not healthy on $3 within 60 s:" >&2; cluster_status "$1" >&2 || true; exit 1
    fi
    sleep 0.1
  done
}

# node_pid PGID ID: pid of node ID's `node run` process (not its supervisor) in the group.
node_pid() {
  pgrep -g "$1" -f "bin/cluster node run --id $2 " | head -n 1
}

# proc_cpu_ticks PID: user + system clock ticks of PID so far.
proc_cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null; }
proc_rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null; }
