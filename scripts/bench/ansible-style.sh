#!/usr/bin/env bash
# The rolling update a user would script by hand instead of `cluster update`: the shape of
# an Ansible play with `serial: 1`, as plain shell. For each node in inventory order:
#   1. back up the running release:   cp -a <data>/current/ <data>/ansible-backup/<time>/
#   2. copy the new release:          rsync -a --delete <dist>/ <data>/ansible/<hash>/
#   3. point current at it:           ln -sfn + mv -T (atomic)
#   4. restart:                       SIGTERM the node; its supervisor starts it again
#   5. poll health every POLL_MS:     `cluster status --json` until the node serves the
#                                     new build as leader or follower (deadline 60 s)
#   6. wait for stabilization:        sleep STABILIZE_MS
# It knows nothing about Raft: no leader-last order, no preflight, no revert.
#
#   scripts/bench/ansible-style.sh DIR N DIST STABILIZE_MS POLL_MS
#
# DIR holds the nodes' data dirs n1..nN (as `cluster local up --dir DIR` makes them); DIST
# is a stamped dist. CLUSTER_BIN is the `cluster` used for health polls (default: PATH).
# Prints the wall time in ms on stdout.
set -euo pipefail

[ $# -eq 5 ] || { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
dir=$1 nodes=$2 dist=$3 stabilize_ms=$4 poll_ms=$5
bin=${CLUSTER_BIN:-cluster}
hash=$(jq -r '.buildHash // empty' "$dist/version.json")
[ -n "$hash" ] || { echo "$dist/version.json has no buildHash: stamp the dist first" >&2; exit 2; }

now_ns() { date +%s%N; }
started=$(now_ns)
for id in $(seq 1 "$nodes"); do
  data="$dir/n$id"
  mkdir -p "$data/ansible-backup" "$data/ansible"
  cp -a "$(readlink -f "$data/current")/" "$data/ansible-backup/$(now_ns)"
  rsync -a --delete "$dist/" "$data/ansible/$hash/"
  ln -sfn "ansible/$hash" "$data/current.ansible"
  mv -T "$data/current.ansible" "$data/current"

  # The node process (not its supervisor): its argv[0] is <data>/current/bin/cluster.
  pid=$(pgrep -f "^$data/current/bin/cluster node run" | head -n 1)
  [ -n "$pid" ] || { echo "node $id is not running" >&2; exit 1; }
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done

  deadline=$(( $(date +%s) + 60 ))
  until "$bin" status --json --node "$(cat "$data/node.addr")" 2>/dev/null |
    jq -e --argjson id "$id" --arg hash "$hash" '(.nodes // [])[] | select(.id == $id) |
      .build_hash == $hash and (.state == "leader" or .state == "follower")' >/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "node $id not healthy within 60 s" >&2; exit 1; }
    sleep "$(awk -v ms="$poll_ms" 'BEGIN { print ms / 1000 }')"
  done
  sleep "$(awk -v ms="$stabilize_ms" 'BEGIN { print ms / 1000 }')"
done
echo $(( ($(now_ns) - started) / 1000000 ))
