#!/usr/bin/env bash
# Measures `cluster` against its targets and against the tools users would pick instead,
# and writes the figures to BENCHMARKS.md (see the definitions there).
#
#   scripts/bench.sh                      # every benchmark, 3 runs each (about 15 minutes)
#   scripts/bench.sh --quick              # 1 run each, small sizes: a smoke run
#   scripts/bench.sh --only gaps,hash     # some benchmarks (repeatable)
#   scripts/bench.sh --runs 5 --out FILE  # more runs; write FILE instead of BENCHMARKS.md
#
# Benchmarks: rollout (orchestration overhead, 3 and 5 nodes, next to an Ansible-style
# script), gaps (leader changes and write latency, next to etcd, and what mutual TLS costs
# next to --insecure nodes), sync (next to an rsync daemon), hash (next to openssl and
# sha256sum), scale (3, 5, 9 nodes), footprint (RSS and CPU of nodes, next to etcd's).
# Every cluster runs with mutual TLS (its own CA; clients as its operator) unless a
# figure says --insecure.
#
# Builds the release binary and the kv_writer and rollout_timeline examples; installs jq,
# rsync and openssl with apt-get when missing; fetches Debian's etcd packages into
# ~/.cache/cluster-bench (unpacked, never installed). Every process it starts runs in a
# process group it stops on exit; every port is OS-assigned or checked free; traffic stays
# on loopback. The text after the "analysis" marker in the output file is kept, and so are
# the sections (and summary rows) of benchmarks --only leaves out.
set -euo pipefail

all=(rollout gaps sync hash scale footprint)
only=()
quick=0
runs=
out=
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --only) IFS=, read -ra more <<<"${2:?--only needs a name}"; only+=("${more[@]}"); shift 2 ;;
    --runs) runs=${2:?--runs needs a number}; shift 2 ;;
    --out) out=${2:?--out needs a file}; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#only[@]} -gt 0 ] || only=("${all[@]}")
for name in "${only[@]}"; do
  [[ " ${all[*]} " == *" $name "* ]] || { echo "unknown benchmark $name (one of: ${all[*]})" >&2; exit 2; }
done
case "${runs:=$([ "$quick" = 1 ] && echo 1 || echo 3)}" in
  ''|*[!0-9]*|0) echo "--runs must be a positive number" >&2; exit 2 ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
out=${out:-$root/BENCHMARKS.md}
selected() { [[ " ${only[*]} " == *" $1 "* ]]; }

# Pacing of the measured rollouts: the waits a rollout imposes are its configuration.
if [ "$quick" = 1 ]; then stabilize_ms=1000; else stabilize_ms=2000; fi
poll_ms=100
default_stabilize_ms=10000 default_poll_ms=500
writer_timeout_ms=2000
# kill -9 of the leader: the client first on the leader or on a follower, and its timeout.
kill_variants=(leader/2000 follower/2000 leader/500 follower/500)
kill_events=(kill-leader-2000 kill-follower-2000 kill-leader-500 kill-follower-500)

work=$(mktemp -d -t cluster-bench-XXXXXX)
source "$root/scripts/bench/lib.sh"
source "$root/scripts/bench/etcd.sh"
fleet_chain=
trap 'bench_cleanup; [ -z "$fleet_chain" ] || { iptables -D OUTPUT -o lo -j "$fleet_chain"; iptables -F "$fleet_chain"; iptables -X "$fleet_chain"; } 2>/dev/null; rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)

# --- tools and build ------------------------------------------------------------------------
install_missing jq=jq rsync=rsync openssl=openssl stress-ng=stress-ng iptables=iptables
say "building the release binary and the benchmark clients (cargo build --release)"
release_build "$root" --bin cluster --example kv_writer --example rollout_timeline
bin="$target_dir/release/cluster"
writer="$target_dir/release/examples/kv_writer"
timeline="$target_dir/release/examples/rollout_timeline"
if selected gaps || selected footprint; then etcd_install; fi

# --- results --------------------------------------------------------------------------------
# row SECTION FIGURE OURS REFERENCE RATIO TARGET MET: one line of the summary table.
row() {
  local line="|" field
  for field in "$@"; do line+=" $field |"; done
  echo "$line" >>"$work/summary-$current.md"
  echo "  => $line" >&2
}
detail() { cat >>"$work/details-$1.md"; }
met() { awk -v v="$1" -v limit="$2" 'BEGIN { print (v <= limit ? "met" : "**not met**") }'; }

# update_timed ADDRS DIST STABILIZE POLL [EXTRA...]: runs `cluster update`; sets wall_ms and
# inner_ms (the deployment's own start-to-finish, from the replicated history).
update_timed() {
  local addrs=$1 dist=$2 stabilize=$3 poll=$4; shift 4
  local t0; t0=$(now_ns)
  "$bin" update --dist "$dist" --node "${addrs%%,*}" --stabilize-ms "$stabilize" --soak-ms 0 \
    --poll-interval-ms "$poll" --health-deadline-ms 30000 --json "$@" >"$work/update.json" \
    2>"$work/update.err" || { echo "update failed:" >&2; cat "$work/update.err" "$work/update.json" >&2; exit 1; }
  wall_ms=$(ms_since "$t0")
  jq -e '.outcome.outcome == "completed"' "$work/update.json" >/dev/null ||
    { echo "rollout did not complete:" >&2; cat "$work/update.json" >&2; exit 1; }
  inner_ms=$(jq '.outcome.finished_ms - .outcome.started_ms' "$work/update.json")
}

dist_seq=0
next_dist() { dist_seq=$(( dist_seq + 1 )); dist_dir="$work/dist-$dist_seq"; dist_hash=$(make_dist "$dist_dir" "release $dist_seq"); }

# --- 1 + 5: rollout overhead, the Ansible-style script, scale ----------------------------------
declare -A rollout_wall rollout_inner ansible_wall
# measure_rollouts N STABILIZE POLL RUNS [ansible]: fills rollout_wall[N/STABILIZE] etc.
measure_rollouts() {
  local n=$1 stabilize=$2 poll=$3 count=$4 with_ansible=${5:-} walls=() inners=() ansible=() run
  local key="$n/$stabilize"
  local dir="$work/rollout-$n-$stabilize"
  say "rollout: $n nodes, stabilize $stabilize ms, poll $poll ms, $count run(s)"
  local_up "$dir" "$n"
  local group=$up_pid
  for run in $(seq 1 "$count"); do
    next_dist
    addrs=$(current_addrs "$dir" "$n")
    update_timed "$addrs" "$dist_dir" "$stabilize" "$poll"
    walls+=("$wall_ms"); inners+=("$inner_ms")
    wait_healthy "$(current_addrs "$dir" "$n")" "$n" "$dist_hash"
    say "  run $run: cluster update ${wall_ms} ms (deployment ${inner_ms} ms)"
  done
  if [ "$key" = "3/$stabilize_ms" ]; then
    # One more rollout, watched, to say where the time goes.
    next_dist
    addrs=$(current_addrs "$dir" "$n")
    "$timeline" "$addrs" >"$work/timeline.txt" 2>&1 &
    local watcher=$!
    update_timed "$addrs" "$dist_dir" "$stabilize" "$poll"
    wait "$watcher" || true
    wait_healthy "$(current_addrs "$dir" "$n")" "$n" "$dist_hash"
    cp "$work/timeline.txt" "$work/timeline-$n.txt"
  fi
  if [ -n "$with_ansible" ]; then
    for run in $(seq 1 "$count"); do
      next_dist
      ansible+=("$(CLUSTER_BIN=$bin "$root/scripts/bench/ansible-style.sh" "$dir" "$n" "$dist_dir" "$stabilize" "$poll")")
      wait_healthy "$(current_addrs "$dir" "$n")" "$n" "$dist_hash"
      say "  ansible-style run $run: ${ansible[-1]} ms"
    done
    ansible_wall[$key]=$(median "${ansible[@]}")
  fi
  stop_group "$group"
  rm -rf "$dir"
  rollout_wall[$key]=$(median "${walls[@]}")
  rollout_inner[$key]=$(median "${inners[@]}")
}

bench_rollout() {
  local n key waits ours ansible
  for n in 3 5; do measure_rollouts "$n" "$stabilize_ms" "$poll_ms" "$runs" ansible; done
  [ "$quick" = 1 ] || measure_rollouts 3 "$default_stabilize_ms" "$default_poll_ms" "$runs"
  {
    echo "Wall time of \`cluster update\` (upload, preflight, rollout, until it exits) over the"
    echo "waits the configuration imposes: **N x \`--stabilize-ms\`**. Restarting a node and"
    echo "waiting for it to report healthy have no configured minimum (\`--health-deadline-ms\`"
    echo "is only an upper bound, 30 s here), so they count as overhead, as do upload, preflight,"
    echo "sync, verification, the leadership hand-off and poll granularity. The Ansible-style"
    echo "script (\`scripts/bench/ansible-style.sh\`: cp -a backup, rsync, restart, poll health"
    echo "every \`--poll-interval-ms\`, sleep the stabilization window) runs over the same nodes"
    echo "with the same waits. Fresh release per run (a label file changes; the binary is the"
    echo "same, so sync moves little)."
    echo
    echo "| nodes | stabilize / poll | cluster update | deployment (leader's record) | waits | ratio | per-node overhead | Ansible-style | its ratio |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
  } | detail rollout
  for key in "3/$stabilize_ms" "5/$stabilize_ms" "3/$default_stabilize_ms"; do
    [ -n "${rollout_wall[$key]:-}" ] || continue
    n=${key%/*}; local s=${key#*/}
    local poll=$poll_ms; [ "$s" = "$default_stabilize_ms" ] && poll=$default_poll_ms
    waits=$(( n * s ))
    ours=$(ratio "${rollout_wall[$key]}" "$waits")
    local per_node=$(( (rollout_wall[$key] - waits) / n ))
    ansible=${ansible_wall[$key]:-}
    echo "| $n | $s ms / $poll ms | ${rollout_wall[$key]} ms | ${rollout_inner[$key]} ms | $waits ms | $ours | $per_node ms |" \
      "${ansible:+$ansible ms} | ${ansible:+$(ratio "$ansible" "$waits")} |" | detail rollout
    row "1 overhead" "$n nodes, stabilize $s ms, poll $poll ms: wall / (N x stabilize)" "$ours" \
      "${ansible:+Ansible-style $(ratio "$ansible" "$waits")}" \
      "${ansible:+$(ratio "$ours" "$(ratio "$ansible" "$waits")")}" "<= 1.05" "$(met "$ours" 1.05)"
  done
  if [ -s "$work/timeline-3.txt" ]; then
    {
      echo
      echo "Where the time goes: one more 3-node rollout (stabilize $stabilize_ms ms, poll $poll_ms ms),"
      echo "its replicated record polled every 20 ms by \`rollout_timeline\`: when each node was"
      echo "first seen in each phase, in ms after the deployment started (phases shorter than a"
      echo "poll may be missing)."
      echo
      echo '```'
      cat "$work/timeline-3.txt"
      echo '```'
    } | detail rollout
  fi
}

bench_scale() {
  local n key
  for n in 3 5 9; do
    [ -n "${rollout_wall[$n/$stabilize_ms]:-}" ] || measure_rollouts "$n" "$stabilize_ms" "$poll_ms" "$runs"
  done
  {
    echo "Rollout wall time by cluster size (stabilize $stabilize_ms ms, poll $poll_ms ms; up to 5"
    echo "voters, the nodes' default \`--max-voters\`, and learners beyond, updated one at a"
    echo "time, the default \`--max-parallel\`), then a fleet of learners updated in parallel."
    echo
    echo "| nodes | cluster update | waits | ratio | per-node overhead |"
    echo "|---:|---:|---:|---:|---:|"
  } | detail scale
  for n in 3 5 9; do
    key="$n/$stabilize_ms"
    local waits=$(( n * stabilize_ms ))
    echo "| $n | ${rollout_wall[$key]} ms | $waits ms | $(ratio "${rollout_wall[$key]}" "$waits") |" \
      "$(( (rollout_wall[$key] - waits) / n )) ms |" | detail scale
  done
  row "5 scale" "9 nodes: wall / (N x stabilize)" "$(ratio "${rollout_wall[9/$stabilize_ms]}" $(( 9 * stabilize_ms )))" \
    "3 nodes: $(ratio "${rollout_wall[3/$stabilize_ms]}" $(( 3 * stabilize_ms )))" "" "(none)" "-"
  bench_fleet
}

# --- 2: leader changes and write latency ---------------------------------------------------------
# gap_run BACKEND ADDRS ACTION...: a sequential writer over ADDRS while ACTION runs; sets
# gap_ms, acked, lost (after reading every acknowledged key back through the addresses
# `now_addrs` prints: restarted cluster nodes listen on new ports).
gap_run() {
  local backend=$1 addrs=$2; shift 2
  "$writer" gap "$backend" "$addrs" "$work/acked" "${gap_timeout_ms:-$writer_timeout_ms}" >"$work/gap.json" &
  local writer_pid=$!
  pids+=("$writer_pid")
  sleep 0.5
  "$@"
  sleep 1
  kill -TERM "$writer_pid"; wait "$writer_pid"
  gap_ms=$(jq .max_gap_ms "$work/gap.json")
  acked=$(jq .acked "$work/gap.json")
  "$writer" verify "$backend" "$(now_addrs)" "$work/acked" >"$work/verify.json" || true
  lost=$(jq .lost "$work/verify.json")
  say "  $backend: longest gap ${gap_ms} ms, $acked acknowledged, $lost lost"
}

# order ADDRS FIRST: ADDRS with the FIRST-th (1-based) first.
order() {
  local IFS=, i out=()
  local all=($1)
  out=("${all[$(( $2 - 1 ))]}")
  for i in "${!all[@]}"; do [ "$i" = $(( $2 - 1 )) ] || out+=("${all[$i]}"); done
  echo "${out[*]}"
}

bench_gaps() {
  local dir="$work/gaps" run group leader next pid
  declare -A g=() l=()
  say "gaps: 3 supervised cluster nodes"
  local_up "$dir" 3
  group=$up_pid
  now_addrs() { current_addrs "$dir" 3; }
  our_leader() { cluster_status "$(current_addrs "$dir" 3)" | jq -r '.leader // empty'; }
  addrs=$(current_addrs "$dir" 3)
  "$writer" latency cluster "$(order "$addrs" "$(our_leader)" | cut -d, -f1)" \
    "$([ "$quick" = 1 ] && echo 300 || echo 2000)" >"$work/lat-cluster.json"
  our_term() { cluster_status "$(current_addrs "$dir" 3)" | jq -r 'select(.leader != null) | .term'; }
  wait_new_leader() { # wait_new_leader TERM: until a leader of a later term is known (the
    # killed node may win again: its supervisor restarts it at once)
    local deadline=$(( $(date +%s) + 30 ))
    until [ "$(our_term || echo 0)" -gt "$1" ] 2>/dev/null; do
      [ "$(date +%s)" -lt "$deadline" ] || { echo "no new leader within 30 s" >&2; exit 1; }
      sleep 0.05
    done
  }
  local gap_timeout_ms
  for run in $(seq 1 "$runs"); do
    gap_timeout_ms=$writer_timeout_ms
    addrs=$(current_addrs "$dir" 3); leader=$(our_leader); next=$(( leader % 3 + 1 ))
    gap_run cluster "$(order "$addrs" "$leader")" \
      "$bin" leader transfer "$next" --node "${addrs%%,*}" "${client_flags[@]}"
    g[cluster/transfer]+=" $gap_ms"; l[cluster]=$(( ${l[cluster]:-0} + lost ))

    next_dist
    addrs=$(current_addrs "$dir" 3)
    gap_run cluster "$addrs" update_timed "$addrs" "$dist_dir" 1000 "$poll_ms"
    g[cluster/rollout]+=" $gap_ms"; l[cluster]=$(( l[cluster] + lost ))
    wait_healthy "$(current_addrs "$dir" 3)" 3 "$dist_hash"

    for variant in "${kill_variants[@]}"; do
      local on=${variant%/*}; gap_timeout_ms=${variant#*/}
      # The leader and its process (a status read can miss a leader for a moment).
      local deadline=$(( $(date +%s) + 30 ))
      until addrs=$(current_addrs "$dir" 3) && leader=$(our_leader) && [ -n "$leader" ] &&
          pid=$(node_pid "$group" "$leader") && [ -n "$pid" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "gaps: no leader process found within 30 s" >&2; exit 1; }
        sleep 0.1
      done
      local first=$leader; [ "$on" = follower ] && first=$(( leader % 3 + 1 ))
      # Its supervisor is stopped meanwhile, so the node stays down as the etcd member does
      # (restarted at once, a node comes back as leader of its term, a smaller gap).
      local term supervisor; term=$(our_term); supervisor=$(ps -o ppid= -p "$pid" | tr -d ' ')
      kill -STOP "$supervisor"
      kill_ours() { kill -KILL "$pid"; wait_new_leader "$term"; }
      gap_run cluster "$(order "$addrs" "$first")" kill_ours
      g[cluster/kill-$on-$gap_timeout_ms]+=" $gap_ms"; l[cluster]=$(( l[cluster] + lost ))
      kill -CONT "$supervisor"
      wait_healthy "$(current_addrs "$dir" 3)" 3 "$dist_hash"
    done
  done
  stop_group "$group"

  say "gaps: 3 etcd members"
  etcd_up "$work/etcd"
  now_addrs() { echo "$etcd_endpoints"; }
  "$writer" latency etcd "$(order "$etcd_endpoints" "$(etcd_leader)" | cut -d, -f1)" \
    "$([ "$quick" = 1 ] && echo 300 || echo 2000)" >"$work/lat-etcd.json"
  etcd_wait_leader() { # etcd_wait_leader OLD
    local deadline=$(( $(date +%s) + 30 ))
    until [ -n "$(etcd_leader)" ] && [ "$(etcd_leader)" != "$1" ]; do
      [ "$(date +%s)" -lt "$deadline" ] || { echo "etcd: no new leader within 30 s" >&2; exit 1; }
      sleep 0.05
    done
  }
  for run in $(seq 1 "$runs"); do
    gap_timeout_ms=$writer_timeout_ms
    leader=$(etcd_leader); next=$(( leader % 3 + 1 ))
    local next_id; next_id=$(etcd_member_id "$next")
    gap_run etcd "$(order "$etcd_endpoints" "$leader")" \
      "$etcdctl_bin" --endpoints "127.0.0.1:${etcd_client_ports[$leader]}" move-leader "$next_id"
    g[etcd/transfer]+=" $gap_ms"; l[etcd]=$(( ${l[etcd]:-0} + lost ))
    for variant in "${kill_variants[@]}"; do
      local on=${variant%/*}; gap_timeout_ms=${variant#*/}
      leader=$(etcd_leader)
      local first=$leader; [ "$on" = follower ] && first=$(( leader % 3 + 1 ))
      kill_etcd() { kill -KILL "${etcd_pids[$leader]}"; etcd_wait_leader "$leader"; }
      gap_run etcd "$(order "$etcd_endpoints" "$first")" kill_etcd
      g[etcd/kill-$on-$gap_timeout_ms]+=" $gap_ms"; l[etcd]=$(( l[etcd] + lost ))
      stop_group "${etcd_pids[$leader]}"
      etcd_start_member "$work/etcd" "$leader" existing
      local deadline=$(( $(date +%s) + 30 ))
      until "$etcdctl_bin" --endpoints "$etcd_endpoints" endpoint health >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "etcd member $leader did not come back" >&2; exit 1; }
        sleep 0.1
      done
    done
  done
  for i in 1 2 3; do stop_group "${etcd_pids[$i]}"; done

  {
    echo "One sequential client (\`examples/kv_writer.rs\`, the same loop for both stores: our gRPC"
    echo "client, and etcd's HTTP/JSON gateway \`POST /v3/kv/put\` over a kept-alive connection)"
    echo "writes a new key after each acknowledgement; request timeout **${writer_timeout_ms} ms** (and 500 ms"
    echo "in the kill rows that say so: a stuck request costs the client its timeout); on any"
    echo "error it moves to the next endpoint of its list after 5 ms. The figure is the longest"
    echo "time between two acknowledged writes, over a window from 0.5 s before the event to 1 s"
    echo "after a new leader is known. Afterwards every acknowledged key is read back"
    echo "(linearizable reads): \"lost\" counts keys missing or wrong. Both stores: 3 members on"
    echo "loopback, election timeout 300 ms (cluster: heartbeat 100 ms; etcd refuses a"
    echo "heartbeat above 1/5 of the election timeout, so it runs 60 ms). Cluster nodes run with"
    echo "mutual TLS (\`cluster local up\`: a CA of its own; the client as its operator), etcd"
    echo "plaintext (its default; its own TLS is not measured). Events: \`cluster leader"
    echo "transfer\` / \`etcdctl move-leader\` with the client on the old leader; a rollout of all"
    echo "3 nodes (stabilize 1000 ms; the leader hands off to an updated node; no etcd"
    echo "equivalent); \`kill -9\` of the leader with the client first on the leader, and first on"
    echo "a follower (which forwards to the dead leader). The killed member stays down until the"
    echo "window ends (cluster nodes run under \`cluster supervise\`, stopped meanwhile: a node"
    echo "restarted at once resumes as leader of its term, a different and shorter event)."
    echo
    echo "| event (kill: client first on / timeout ms) | cluster gap (runs) | etcd gap (runs) |"
    echo "|---|---|---|"
    for event in transfer rollout "${kill_events[@]}"; do
      echo "| $event | ${g[cluster/$event]:-} ms | ${g[etcd/$event]:--} ${g[etcd/$event]:+ms} |"
    done
    echo
    echo "Acknowledged writes lost: cluster ${l[cluster]}, etcd ${l[etcd]}."
    echo
    echo "Write latency, one client, sequential writes to the leader ($(jq .count "$work/lat-cluster.json") writes):"
    echo "cluster p50 $(jq .p50_ms "$work/lat-cluster.json") ms, p99 $(jq .p99_ms "$work/lat-cluster.json") ms;"
    echo "etcd p50 $(jq .p50_ms "$work/lat-etcd.json") ms, p99 $(jq .p99_ms "$work/lat-etcd.json") ms."
  } | detail gaps
  local ours theirs event
  for event in transfer "${kill_events[@]}"; do
    ours=$(median ${g[cluster/$event]}); theirs=$(median ${g[etcd/$event]})
    local timeout=${event##*-}; [ "$event" = transfer ] && timeout=$writer_timeout_ms
    row "2 leader change" "longest write gap, ${event%-*} (timeout $timeout ms)" "$ours ms" "etcd $theirs ms" \
      "$(ratio "$ours" "$theirs")" "<= etcd" "$(met "$ours" "$theirs")"
  done
  ours=$(median ${g[cluster/rollout]})
  theirs=$(median ${g[etcd/transfer]})
  row "2 leader change" "longest write gap, full 3-node rollout (includes a hand-off)" "$ours ms" \
    "etcd move-leader $theirs ms" "$(ratio "$ours" "$theirs")" "<= etcd transfer" "$(met "$ours" "$theirs")"
  row "2 leader change" "acknowledged writes lost (all events)" "${l[cluster]}" "etcd ${l[etcd]}" "-" "0" \
    "$([ "${l[cluster]}" = 0 ] && echo met || echo '**not met**')"
  for q in p50 p99; do
    ours=$(jq ".${q}_ms" "$work/lat-cluster.json"); theirs=$(jq ".${q}_ms" "$work/lat-etcd.json")
    row "2 latency" "write latency $q" "$ours ms" "etcd $theirs ms" "$(ratio "$ours" "$theirs")" "<= etcd" "$(met "$ours" "$theirs")"
  done
  tls_cost "$(median ${g[etcd/transfer]})"
  elections_under_load
}

# elections_under_load: what a short election timeout costs on a busy host. 3 members under
# `stress-ng` (every core busy twice over, and a disk writer that makes fsync slow) with one
# sequential writer, for the same time each: cluster nodes at --election-timeout-ms 300 (the
# default: a follower campaigns 300-360 ms after it last heard from its leader) and 900 (the
# campaign window the earlier mapping gave 300: 900-1200 ms), and etcd at 300 ms (campaign
# 300-600 ms). Elections: how far the term rose (each election raises it; pre-votes do not).
elections_under_load() {
  local secs setting load_pid
  if [ "$quick" = 1 ]; then secs=15; else secs=60; fi
  declare -gA elections=() load_gap=()
  loaded() { # loaded SECONDS: stress-ng in its own group for SECONDS
    spawn "$work/stress.log" stress-ng --cpu $(( 2 * $(nproc) )) --hdd 1 --hdd-bytes 64M \
      --temp-path "$work" --timeout "${1}s"
    load_pid=$spawned_pid
  }
  # under_load KEY BACKEND ADDRS TERM_COMMAND: a writer over ADDRS and stress-ng for $secs s;
  # elections[KEY] is how far TERM_COMMAND's term rose, load_gap[KEY] the longest write gap.
  under_load() {
    local key=$1 backend=$2 addrs=$3 term_of=$4 term0 term1 writer_pid
    term0=$($term_of)
    "$writer" gap "$backend" "$addrs" "$work/acked-load-$backend" 2000 >"$work/gap-load.json" &
    writer_pid=$!; pids+=("$writer_pid")
    loaded "$secs"
    sleep "$secs"
    stop_group "$load_pid"
    kill -TERM "$writer_pid"; wait "$writer_pid" || true
    term1=$($term_of)
    elections[$key]=$(( term1 - term0 ))
    load_gap[$key]=$(jq .max_gap_ms "$work/gap-load.json")
  }
  cluster_term() { cluster_status "$addrs" | jq -r .term; }
  etcd_term() { etcd_status | awk -F', ' '{ if ($7 > t) t = $7 } END { print t + 0 }'; }
  for setting in 300 900; do
    say "gaps: elections under load: 3 nodes, --election-timeout-ms $setting, $secs s"
    nodes_up "$work/elections-$setting" 3 tls --election-timeout-ms "$setting"
    under_load "cluster/$setting" cluster "$addrs" cluster_term
    for group in "${up_groups[@]}"; do stop_group "$group"; done
  done
  say "gaps: elections under load: 3 etcd members, --election-timeout 300, $secs s"
  etcd_up "$work/etcd-load"
  under_load etcd/300 etcd "$etcd_endpoints" etcd_term
  for i in 1 2 3; do stop_group "${etcd_pids[$i]}"; done
  {
    echo
    echo "Elections on a loaded host: 3 members, one sequential writer, ${secs} s under"
    echo "\`stress-ng --cpu $(( 2 * $(nproc) )) --hdd 1\` (every core busy twice over; a disk writer slows"
    echo "every fsync). An election timeout of T: a cluster follower campaigns T to 1.2 T after it"
    echo "last heard from its leader, an etcd follower T to 2 T. 900 ms is the campaign window"
    echo "cluster's 300 ms default gave before the timeout meant the whole wait."
    echo
    echo "| members | election timeout | elections in ${secs} s | longest write gap |"
    echo "|---|---:|---:|---:|"
    echo "| cluster | 300 ms | ${elections[cluster/300]} | ${load_gap[cluster/300]} ms |"
    echo "| cluster | 900 ms | ${elections[cluster/900]} | ${load_gap[cluster/900]} ms |"
    echo "| etcd | 300 ms | ${elections[etcd/300]} | ${load_gap[etcd/300]} ms |"
  } | detail gaps
  row "2 leader change" "elections in ${secs} s on a loaded host, election timeout 300 ms" \
    "${elections[cluster/300]}" "etcd ${elections[etcd/300]}" "-" "<= etcd" \
    "$(met "${elections[cluster/300]}" "${elections[etcd/300]}")"
}

# tls_cost ETCD_TRANSFER_MS: write latency and the leader-transfer write gap of two 3-node
# clusters up at once, one of --insecure nodes (plaintext clients), one of --tls nodes
# (clients with the operator's certificate), started the same way (`nodes_up`), measured in
# alternating rounds so load on the shared machine falls on both alike.
tls_cost() {
  local etcd_transfer=$1 rounds count round mode leader next
  # An odd number of rounds, so the median is one of them.
  if [ "$quick" = 1 ]; then rounds=3 count=300; else rounds=$(( runs > 5 ? runs : 5 )) count=1000; fi
  [ $(( rounds % 2 )) = 1 ] || rounds=$(( rounds + 1 ))
  declare -A p50=() p99=() gap=() lost_by=() node_groups=() dirs=([insecure]="$work/tls-cost-insecure" [tls]="$work/tls-cost-tls")
  say "gaps: TLS cost: 3 --insecure nodes and 3 --tls nodes, $rounds rounds of $count writes and a transfer"
  for mode in insecure tls; do nodes_up "${dirs[$mode]}" 3 "$mode"; node_groups[$mode]="${up_groups[*]}"; done
  for round in $(seq 1 "$rounds"); do
    local turns=(insecure tls); [ $(( round % 2 )) = 0 ] && turns=(tls insecure)
    for mode in "${turns[@]}"; do
      use_client "${dirs[$mode]}"
      addrs=$(current_addrs "${dirs[$mode]}" 3)
      now_addrs() { echo "$addrs"; }
      leader=$(cluster_status "$addrs" | jq -r '.leader // empty')
      "$writer" latency cluster "$(order "$addrs" "$leader" | cut -d, -f1)" "$count" >"$work/lat-$mode.json"
      p50[$mode]+=" $(jq .p50_ms "$work/lat-$mode.json")"; p99[$mode]+=" $(jq .p99_ms "$work/lat-$mode.json")"
      next=$(( leader % 3 + 1 ))
      gap_run cluster "$(order "$addrs" "$leader")" \
        "$bin" leader transfer "$next" --node "$(order "$addrs" "$leader" | cut -d, -f1)" "${client_flags[@]}"
      gap[$mode]+=" $gap_ms"; lost_by[$mode]=$(( ${lost_by[$mode]:-0} + lost ))
      say "  round $round, $mode: write p50 $(jq .p50_ms "$work/lat-$mode.json") ms, p99 $(jq .p99_ms "$work/lat-$mode.json") ms, transfer gap $gap_ms ms"
    done
  done
  local group
  for group in ${node_groups[insecure]} ${node_groups[tls]}; do stop_group "$group"; done
  local plain50 tls50 plain99 tls99 plaingap tlsgap
  plain50=$(median ${p50[insecure]}); tls50=$(median ${p50[tls]})
  plain99=$(median ${p99[insecure]}); tls99=$(median ${p99[tls]})
  plaingap=$(median ${gap[insecure]}); tlsgap=$(median ${gap[tls]})
  {
    echo
    echo "What mutual TLS costs, measured in the same run: two 3-node clusters up at once, one of"
    echo "\`node run --insecure\` nodes (plaintext client), one of \`node run --tls\` nodes (a CA of"
    echo "its own, a certificate per node; the client as its operator, \`CLUSTER_TLS\`), both"
    echo "unsupervised, default timing, started the same way (\`nodes_up\` in scripts/bench/lib.sh)."
    echo "$rounds rounds, alternating which cluster goes first; each round, per cluster: $count"
    echo "sequential writes to the leader (latency; the first also opens the client's connection,"
    echo "TLS handshake included, which p50 and p99 do not see), then a \`leader transfer\` with the"
    echo "writer on the old leader (the gap, as above; the transfer itself is a \`cluster\` command"
    echo "with the same credentials). Figures: median over rounds (each round's in brackets)."
    echo
    echo "| figure | --insecure | --tls | TLS / plaintext |"
    echo "|---|---:|---:|---:|"
    echo "| write latency p50 | $plain50 ms (${p50[insecure]# }) | $tls50 ms (${p50[tls]# }) | $(ratio "$tls50" "$plain50") |"
    echo "| write latency p99 | $plain99 ms (${p99[insecure]# }) | $tls99 ms (${p99[tls]# }) | $(ratio "$tls99" "$plain99") |"
    echo "| longest write gap, leader transfer | $plaingap ms (${gap[insecure]# }) | $tlsgap ms (${gap[tls]# }) | $(ratio "$tlsgap" "$plaingap") |"
    echo
    echo "Acknowledged writes lost: --insecure ${lost_by[insecure]}, --tls ${lost_by[tls]}."
  } | detail gaps
  row "2 TLS cost" "write latency p50, --tls nodes (reference: --insecure)" "$tls50 ms" "plaintext $plain50 ms" \
    "$(ratio "$tls50" "$plain50")" "<= 1.10" "$(met "$(ratio "$tls50" "$plain50")" 1.10)"
  row "2 TLS cost" "write latency p99, --tls nodes" "$tls99 ms" "plaintext $plain99 ms" \
    "$(ratio "$tls99" "$plain99")" "(none)" "-"
  row "2 TLS cost" "longest write gap, transfer, --tls nodes" "$tlsgap ms" "plaintext $plaingap ms" \
    "$(ratio "$tlsgap" "$plaingap")" "<= etcd ($etcd_transfer ms)" "$(met "$tlsgap" "$etcd_transfer")"
  row "2 TLS cost" "acknowledged writes lost (transfers)" "${lost_by[tls]}" "plaintext ${lost_by[insecure]}" "-" "0" \
    "$([ "${lost_by[tls]}${lost_by[insecure]}" = 00 ] && echo met || echo '**not met**')"
}

# bench_fleet: a large cluster on this machine: 50 supervised nodes, 5 voters (`--max-voters
# 5`) and 45 learners, rolled out with `--max-parallel 8` to a release with 20 MiB of new
# content. Wall time against the waits the configuration imposes (one window per wave of
# learners and per voter), bytes sent from the leader's port (iptables counters on loopback)
# against the release's size, and the peak of all its processes' RSS together.
bench_fleet() {
  local n=50 voters=5 parallel=8 mib=20 dir="$work/fleet" group leader leader_port
  [ "$quick" = 1 ] && n=12 voters=3 parallel=4 mib=5
  say "fleet: $n supervised nodes ($voters voters), --max-parallel $parallel, $mib MiB of new content"
  local_up "$dir" "$n" --max-voters "$voters"
  group=$up_pid
  addrs=$(current_addrs "$dir" "$n")
  leader=$(cluster_status "$addrs" | jq -r .leader)
  leader_port=$(cluster_status "$addrs" | jq -r --argjson l "$leader" '.nodes[] | select(.id == $l) | .addr' | sed 's/.*://')
  dist_seq=$(( dist_seq + 1 )); dist_dir="$work/dist-$dist_seq"
  dist_hash=$(make_dist "$dist_dir" "release $dist_seq" "$mib")
  local release_bytes; release_bytes=$(find "$dist_dir" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
  fleet_chain="cluster-bench-$$"
  iptables -N "$fleet_chain" && iptables -I OUTPUT -o lo -j "$fleet_chain" &&
    iptables -A "$fleet_chain" -p tcp --sport "$leader_port" ||
    { echo "fleet: cannot add iptables counters (root needed)" >&2; exit 1; }
  # Peak RSS of every process of the cluster together, sampled every 0.5 s.
  ( peak=0
    while kill -0 "$group" 2>/dev/null; do
      total=$(for p in $(pgrep -g "$group"); do awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null; done |
        awk '{ s += $1 } END { print s + 0 }')
      [ "$total" -gt "$peak" ] && peak=$total && echo "$peak" >"$work/fleet-peak"
      sleep 0.5
    done ) &
  local sampler=$!
  pids+=("$sampler")
  # 50 processes share 2 cores here, so acknowledgements run late in a way they would not on
  # 50 machines: the staleness limit is 1 s, not 200 ms (this is not a staleness test).
  update_timed "$addrs" "$dist_dir" "$stabilize_ms" "$poll_ms" --max-parallel "$parallel" \
    --stale-ack-ms 1000
  local leader_bytes; leader_bytes=$(iptables -L "$fleet_chain" -v -x -n | awk '/spt:/ { s += $2 } END { print s + 0 }')
  local peak_kib; peak_kib=$(cat "$work/fleet-peak")
  local waits=$(( ( (n - voters + parallel - 1) / parallel + voters ) * stabilize_ms ))
  local updated; updated=$(jq '[.outcome.nodes[] | select(.phase == "committed")] | length' "$work/update.json")
  stop_group "$group"
  kill "$sampler" 2>/dev/null || true
  iptables -D OUTPUT -o lo -j "$fleet_chain"; iptables -F "$fleet_chain"; iptables -X "$fleet_chain"; fleet_chain=
  local left; left=$(pgrep -g "$group" | wc -l || true)
  local ratio_wall; ratio_wall=$(ratio "$wall_ms" "$waits")
  local ratio_bytes; ratio_bytes=$(ratio "$leader_bytes" "$release_bytes")
  say "fleet: $wall_ms ms (waits $waits ms), leader sent $leader_bytes B for a $release_bytes B release, peak RSS $(( peak_kib / 1024 )) MiB, $left processes left"
  {
    echo
    echo "$n nodes on this machine: \`cluster local up -n $n --max-voters $voters\` ($voters voters, $(( n - voters ))"
    echo "learners, each node under its own supervisor), then \`cluster update --max-parallel $parallel\` to a"
    echo "release with $mib MiB of new content (stabilize $stabilize_ms ms, poll $poll_ms ms, acknowledgements"
    echo "stale after 1 s: 100 processes share $(nproc) cores). Waits: one"
    echo "window per wave of learners ($(( (n - voters + parallel - 1) / parallel )) waves of at most $parallel) and per voter ($voters)."
    echo "Leader bytes: every byte sent from the leader's port during the rollout (iptables"
    echo "counters on loopback: chunks, manifests, Raft, TLS and TCP/IP headers)."
    echo
    echo "| figure | value |"
    echo "|---|---:|"
    echo "| nodes updated | $updated of $n |"
    echo "| cluster update | $wall_ms ms |"
    echo "| waits | $waits ms |"
    echo "| wall / waits | $ratio_wall |"
    echo "| release size | $(awk -v b="$release_bytes" 'BEGIN { printf "%.1f MB", b / 1e6 }') |"
    echo "| sent by the leader | $(awk -v b="$leader_bytes" 'BEGIN { printf "%.1f MB", b / 1e6 }') |"
    echo "| leader bytes / release size | $ratio_bytes |"
    echo "| peak RSS, all $(( 2 * n )) processes (nodes and supervisors) | $(( peak_kib / 1024 )) MiB |"
    echo "| processes left after stopping it | $left |"
  } | detail scale
  row "5 scale" "$n nodes ($voters voters), --max-parallel $parallel: wall / waits" "$ratio_wall" "-" "-" "<= 1.10" "$(met "$ratio_wall" 1.10)"
  row "5 scale" "$n nodes: bytes sent by the leader / release size" "$ratio_bytes" "-" "-" "<= 2.00" "$(met "$ratio_bytes" 2.00)"
  row "5 scale" "$n nodes: peak RSS of all processes" "$(( peak_kib / 1024 )) MiB" "-" "-" "(stated)" "-"
}

# --- 3: sync, 4: hash (the standalone scripts, parsed) -----------------------------------------
bench_sync() {
  say "sync: scripts/bench-sync.sh (RUNS=$runs)"
  CLUSTER_BIN=$bin RUNS=$runs "$root/scripts/bench-sync.sh" >"$work/sync.txt" 2>"$work/sync.err" ||
    { cat "$work/sync.err" >&2; exit 1; }
  sed -n '/^| case/,$p' "$work/sync.txt" | detail sync
  # | case | release size | cluster bytes | cluster ms | rsync bytes | rsync ms | ratio | ...
  grep '^| (' "$work/sync.txt" | while IFS='|' read -r _ label _ cb cms rb rms r _; do
    label=$(echo "$label" | sed 's/^ *//; s/ *$//'); r=$(echo "$r" | tr -d ' ')
    cms=$(echo "$cms" | tr -d ' '); rms=$(echo "$rms" | tr -d ' ')
    row "3 transfer" "$label: bytes on the wire" "$(echo "$cb" | xargs)" "rsync $(echo "$rb" | xargs)" "$r" "<= 2.00" "$(met "$r" 2.00)"
    row "3 transfer" "$label: time, every byte verified" "$cms ms" "rsync $rms ms" "$(ratio "$cms" "$rms")" "<= 1.05" "$(met "$(ratio "$cms" "$rms")" 1.05)"
  done
}

bench_hash() {
  local size=$([ "$quick" = 1 ] && echo 256 || echo 1024)
  say "hash: scripts/bench-hash.sh $size (RUNS=$runs)"
  CLUSTER_BIN=$bin RUNS=$runs "$root/scripts/bench-hash.sh" "$size" >"$work/hash.txt" 2>"$work/hash.err" ||
    { cat "$work/hash.err" >&2; exit 1; }
  sed -n '/^Hashing/,$p' "$work/hash.txt" | detail hash
  # | tool | wall s | MiB/s | cluster stamp / tool | CPU s | MiB per CPU-s |
  local ours openssl sha
  field() { grep "^| $1 |" "$work/hash.txt" | cut -d'|' -f4 | xargs; }
  ours=$(field "cluster dist stamp"); openssl=$(field "openssl dgst -sha256"); sha=$(field sha256sum)
  row "4 hashing" "dist stamp, $size MiB dist" "$ours MiB/s" "openssl $openssl MiB/s" "$(ratio "$ours" "$openssl")" \
    "> openssl" "$(awk -v a="$ours" -v b="$openssl" 'BEGIN { print (a > b ? "met" : "**not met**") }')"
  row "4 hashing" "dist stamp, $size MiB dist" "$ours MiB/s" "sha256sum $sha MiB/s" "$(ratio "$ours" "$sha")" "(none)" "-"
}

# --- 6: footprint ------------------------------------------------------------------------------
# sample PID SECONDS: sets cpu_pct (of one core) and rss_mib over SECONDS.
sample() {
  local pid=$1 seconds=$2 t0 c0 c1 hz; hz=$(getconf CLK_TCK)
  c0=$(proc_cpu_ticks "$pid"); t0=$(now_ns)
  sleep "$seconds"
  c1=$(proc_cpu_ticks "$pid")
  cpu_pct=$(awk -v d=$(( c1 - c0 )) -v hz="$hz" -v ms="$(ms_since "$t0")" 'BEGIN { printf "%.1f", 100 * d / hz / (ms / 1000) }')
  rss_mib=$(awk -v k="$(proc_rss_kib "$pid")" 'BEGIN { printf "%.1f", k / 1024 }')
}

bench_footprint() {
  local dir="$work/footprint" seconds group id pid cpus=() rsss=() hz; hz=$(getconf CLK_TCK)
  seconds=$([ "$quick" = 1 ] && echo 3 || echo 10)
  say "footprint: 3 supervised nodes idle for $seconds s, then a rollout"
  local_up "$dir" 3
  group=$up_pid
  wait_healthy "$(current_addrs "$dir" 3)" 3 "$(cluster_status "$(current_addrs "$dir" 3)" | jq -r '.nodes[0].build_hash')"
  sleep 2
  local leader; leader=$(cluster_status "$(current_addrs "$dir" 3)" | jq -r .leader)
  local follower=$(( leader % 3 + 1 ))
  sample "$(node_pid "$group" "$follower")" "$seconds"; local f_cpu=$cpu_pct f_rss=$rss_mib
  sample "$(node_pid "$group" "$leader")" "$seconds"; local l_cpu=$cpu_pct l_rss=$rss_mib

  # The leader during a rollout, until it restarts itself (it goes last): CPU over the time
  # its process lived during the rollout, and its largest RSS.
  next_dist
  pid=$(node_pid "$group" "$leader")
  local c0 t0 max_rss=0 last_ticks rss
  c0=$(proc_cpu_ticks "$pid"); t0=$(now_ns); last_ticks=$c0
  (update_timed "$(current_addrs "$dir" 3)" "$dist_dir" "$stabilize_ms" "$poll_ms") &
  local updater=$!
  local lived_ms=0
  while kill -0 "$pid" 2>/dev/null; do
    rss=$(proc_rss_kib "$pid") || break
    [ -n "$rss" ] && [ "$rss" -gt "$max_rss" ] && max_rss=$rss
    local ticks; ticks=$(proc_cpu_ticks "$pid"); [ -n "$ticks" ] && last_ticks=$ticks && lived_ms=$(ms_since "$t0")
    kill -0 "$updater" 2>/dev/null || break
    sleep 0.1
  done
  wait "$updater"
  local r_cpu r_rss
  r_cpu=$(awk -v d=$(( last_ticks - c0 )) -v hz="$hz" -v ms="$lived_ms" 'BEGIN { printf "%.1f", 100 * d / hz / (ms / 1000) }')
  r_rss=$(awk -v k="$max_rss" 'BEGIN { printf "%.1f", k / 1024 }')
  stop_group "$group"

  say "footprint: 3 etcd members idle for $seconds s"
  etcd_up "$work/etcd-fp"
  sleep 2
  local el; el=$(etcd_leader)
  sample "${etcd_pids[$(( el % 3 + 1 ))]}" "$seconds"; local ef_cpu=$cpu_pct ef_rss=$rss_mib
  sample "${etcd_pids[$el]}" "$seconds"; local el_cpu=$cpu_pct el_rss=$rss_mib
  for i in 1 2 3; do stop_group "${etcd_pids[$i]}"; done
  {
    echo "RSS (VmRSS) and CPU (user + system, % of one core, from /proc) of one process: idle"
    echo "over $seconds s in a 3-member cluster, and the cluster leader while it drives a 3-node"
    echo "rollout (stabilize $stabilize_ms ms) until it restarts itself into the new release"
    echo "(it goes last; ${lived_ms} ms here). etcd members (same 3-member loopback setup) for"
    echo "reference. One run."
    echo
    echo "| process | CPU | RSS |"
    echo "|---|---:|---:|"
    echo "| cluster follower, idle | $f_cpu % | $f_rss MiB |"
    echo "| cluster leader, idle | $l_cpu % | $l_rss MiB |"
    echo "| cluster leader, during a rollout | $r_cpu % | $r_rss MiB (max) |"
    echo "| etcd follower, idle | $ef_cpu % | $ef_rss MiB |"
    echo "| etcd leader, idle | $el_cpu % | $el_rss MiB |"
  } | detail footprint
  local worst_rss; worst_rss=$(printf '%s\n' "$f_rss" "$l_rss" | sort -g | tail -1)
  row "6 footprint" "idle node RSS (the larger of follower and leader)" "$worst_rss MiB" \
    "etcd $(printf '%s\n' "$ef_rss" "$el_rss" | sort -g | tail -1) MiB" "-" "< 30 MiB" \
    "$(awk -v v="$worst_rss" 'BEGIN { print (v < 30 ? "met" : "**not met**") }')"
  row "6 footprint" "idle leader: CPU, RSS" "$l_cpu %, $l_rss MiB" "etcd $el_cpu %, $el_rss MiB" "-" "(none)" "-"
  row "6 footprint" "leader during a rollout: CPU, max RSS" "$r_cpu %, $r_rss MiB" "-" "-" "(none)" "-"
}

# --- run and write ---------------------------------------------------------------------------
started_at=$(date -u +'%Y-%m-%d %H:%M UTC')
t_all=$(now_ns)
for name in "${all[@]}"; do
  if selected "$name"; then current=$name; "bench_$name"; fi
done
load_at_end=$(cut -d' ' -f1-3 /proc/loadavg)

titles=(
  "rollout:1. Orchestration overhead (and an Ansible-style script)"
  "gaps:2. Leader changes and write latency (next to etcd)"
  "sync:3. Transfer (next to an rsync daemon)"
  "hash:4. Hashing (next to openssl and sha256sum)"
  "scale:5. Scale"
  "footprint:6. Footprint"
)
analysis= old_header=
[ -f "$out" ] && analysis=$(sed -n '/^<!-- analysis/,$p' "$out")
# The provenance paragraphs of the file this one replaces (quoted when sections are kept).
[ -f "$out" ] && old_header=$(sed -n '/^Written by/,/^Reproduce:/p' "$out" | sed '$d')
# A benchmark's number: its place in `all`, the prefix of its section and summary rows.
number() { local i; for i in "${!all[@]}"; do [ "${all[$i]}" != "$1" ] || echo $(( i + 1 )); done; }
# What --only left out is kept from the file this one replaces: its summary rows, its
# section, and the old header, which says when and how they were measured.
kept=()
if [ -f "$out" ]; then
  for name in "${all[@]}"; do
    selected "$name" && continue
    k=$(number "$name")
    awk -v k="$k" '/^## Summary/ { s = 1; next } /^## / { s = 0 } s && index($0, "| " k " ") == 1' "$out" >"$work/summary-$name.md"
    awk -v k="$k" '/^<!-- analysis/ { s = 0 } /^## / { s = index($0, "## " k ". ") == 1; if (s) next } s' "$out" |
      sed -e '/./,$!d' -e :a -e '/^\n*$/{$d;N;ba' -e '}' >"$work/details-$name.md"
    [ -s "$work/details-$name.md" ] || [ -s "$work/summary-$name.md" ] || continue
    kept+=("$k")
  done
fi
{
  echo "# Benchmarks"
  echo
  echo "Written by \`scripts/bench.sh\` on $started_at ($(( $(ms_since "$t_all") / 1000 )) s; median of"
  echo "$runs run$([ "$runs" = 1 ] || echo s) per figure unless a table says otherwise; every reference measured in the same run)."
  if [ ${#kept[@]} -gt 0 ]; then
    echo "This run measured section$([ ${#only[@]} = 1 ] || echo s) $(for name in "${only[@]}"; do number "$name"; done | sort -n | paste -sd, | sed 's/,/, /g') only;"
    echo "sections $(IFS=,; echo "${kept[*]}" | sed 's/,/, /g') and their summary rows are kept from the file it replaced, which said:"
    echo
    printf '%s\n' "$old_header" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' | sed 's/^/> /; s/^> $/>/'
  fi
  echo
  echo "$([ ${#kept[@]} = 0 ] && echo "Machine" || echo "This run's machine"): $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)),"
  echo "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) memory, Linux $(uname -r);"
  echo "load average $load_at_start at the start, $load_at_end at the end (the machine is"
  echo "shared: other work running at the same time makes figures noisy)."
  echo "cluster $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown) (release build);"
  [ -z "${etcd_bin:-}" ] || echo "etcd $("$etcd_bin" --version | sed -n 's/^etcd Version: //p');"
  echo "$(rsync --version | head -n 1 | sed 's/  protocol.*//'); $(openssl version | cut -d' ' -f1-2)."
  echo
  echo "Reproduce: \`scripts/bench.sh\` (everything, 3 runs), \`scripts/bench.sh --quick\` (smoke"
  echo "run), \`scripts/bench.sh --only $(IFS=,; echo "${only[*]}") --runs $runs\` (this run's selection)."
  echo
  echo "## Summary"
  echo
  echo "| benchmark | figure | cluster | reference | ratio | target | |"
  echo "|---|---|---:|---:|---:|---|---|"
  for name in "${all[@]}"; do cat "$work/summary-$name.md" 2>/dev/null || true; done
  for entry in "${titles[@]}"; do
    name=${entry%%:*}
    [ -f "$work/details-$name.md" ] || continue
    echo
    echo "## ${entry#*:}"
    echo
    cat "$work/details-$name.md"
  done
  if [ -n "$analysis" ]; then
    echo
    echo "$analysis"
  fi
} >"$out"
say "wrote $out"
