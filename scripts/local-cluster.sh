#!/usr/bin/env bash
# Starts a local cluster of real `cluster` nodes on loopback (OS-assigned ports, temp data
# dirs), shows it working, and stops every node on exit. Secure as in production: a CA of
# its own under the temp dir, a certificate per node (`node run --tls`) and an operator
# certificate for the client commands (CLUSTER_TLS).
#
#   scripts/local-cluster.sh            # 3 nodes; stays up until Ctrl-C
#   scripts/local-cluster.sh -n 5       # 5 nodes
#   scripts/local-cluster.sh --once     # show it working, then stop (what CI runs)
set -euo pipefail

nodes=3
once=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) nodes="$2"; shift 2 ;;
    --once) once=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "${CI:-}" = "true" ] && once=1

root=$(cd "$(dirname "$0")/.." && pwd)
echo "building cluster (cargo build)..."
cargo build --quiet --manifest-path "$root/Cargo.toml" --bin cluster
bin="${CARGO_TARGET_DIR:-$root/target}/debug/cluster"
dir=$(mktemp -d -t cluster-local-XXXXXX)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

# The cluster's CA, a certificate per node, and the operator's for the commands below.
"$bin" tls init "$dir/tls/ca" >/dev/null
for id in $(seq 1 "$nodes"); do
  "$bin" tls issue "$dir/tls/n$id" --ca "$dir/tls/ca" --node "$id" >/dev/null
done
"$bin" tls issue "$dir/tls/operator" --ca "$dir/tls/ca" --operator local >/dev/null
echo "made a CA and certificates for $nodes nodes and an operator in $dir/tls"

# Starts node $1 with extra flags and waits until it listens; sets $addr. Not run in a
# subshell, so the cleanup trap sees every pid.
start_node() {
  local id=$1; shift
  "$bin" node run --id "$id" --listen 127.0.0.1:0 --data-dir "$dir/n$id" \
    --tls "$dir/tls/n$id" "$@" >"$dir/n$id.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 200); do
    if [ -s "$dir/n$id/node.addr" ]; then addr=$(cat "$dir/n$id/node.addr"); return; fi
    sleep 0.05
  done
  echo "node $id did not start; its log:" >&2; cat "$dir/n$id.log" >&2; exit 1
}

start_node 1 --bootstrap
first=$addr
echo "node 1 bootstrapped the cluster at $first"
for id in $(seq 2 "$nodes"); do
  start_node "$id" --join "$first"
  echo "node $id at $addr joining through $first"
done
export CLUSTER_NODE="$first" CLUSTER_TLS="$dir/tls/operator"
echo "$ export CLUSTER_NODE=$CLUSTER_NODE CLUSTER_TLS=$CLUSTER_TLS"

# Wait until every node is a voter following one leader.
for _ in $(seq 1 300); do
  voters=$("$bin" status --json 2>/dev/null | grep -c '"role": "voter"' || true)
  [ "$voters" = "$nodes" ] && break
  sleep 0.1
done
"$bin" status
echo
echo "$ cluster kv put greeting hello && cluster kv get greeting"
"$bin" kv put greeting hello
"$bin" kv get greeting
leader=$("$bin" status --json | sed -n 's/^  "leader": \([0-9]*\),/\1/p')
next=$(( leader % nodes + 1 ))
echo "$ cluster leader transfer $next"
"$bin" leader transfer "$next"
"$bin" status
echo
if [ "$once" = 1 ]; then
  echo "stopping the cluster (--once)"
  exit 0
fi
echo "cluster running; data and logs in $dir. Try:"
echo "  export CLUSTER_NODE=$first CLUSTER_TLS=$dir/tls/operator"
echo "  $bin status"
echo "Ctrl-C stops every node."
wait
