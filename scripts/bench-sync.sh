#!/usr/bin/env bash
# Measures what a node-to-node release sync moves, against rsync over loopback.
#
# A ~220 MiB base tree (1,000 files of mixed sizes plus a 20 MiB executable bin/cluster of
# random bytes) is generated deterministically, with three variants of it:
#   (a) one of the 1,000 files rewritten (same size, new content)
#   (b) 1 KiB overwritten in the middle of bin/cluster
#   (c) bin/cluster replaced by different random content
# Real nodes run from the release build, with mutual TLS as in production: a CA made for
# the run, a certificate per node and an operator's for the commands. Node A bootstraps a
# cluster and holds the base and every variant (`cluster dist push`). For each case and
# each run, a fresh node B joins A's cluster (a node fetches releases only from members),
# fetches the base from A, then the timed step runs:
#   cluster dist fetch <variant hash> --from A --node B --json    -> fetched_bytes, wall time
# rsync (from Debian's package; installed if missing) does the same job: a daemon on a free
# loopback port exports the variant read-only and
#   rsync -a --delete --stats rsync://127.0.0.1:PORT/<case>/ DEST/
# updates a fresh copy of the base ("Total bytes received"/"sent", wall time). Unchanged
# files keep the base's mtimes, so rsync's quick check skips them, as in a real update.
# Every figure is the median of RUNS runs (default 3). Bytes are counted on the wire, the
# same way for both: every IP packet to or from node A's port (cluster) or the rsync
# daemon's port (rsync) during the timed step, by iptables counters on loopback (a chain of
# this script's own, removed on exit), so the manifest, TLS, HTTP/2 and TCP/IP headers all
# count. Beside them, what each side says it moved: the chunk bytes node B fetched
# (fetched_bytes) and the manifest bytes it fetched (manifest_bytes: a delta against the
# base it holds), beside the whole manifest's size as node A stores it; rsync's "Total
# bytes received" plus "sent".
#
#   scripts/bench-sync.sh
#   CLUSTER_BIN=path/to/cluster RUNS=5 scripts/bench-sync.sh
#
# Builds the release cluster binary unless CLUSTER_BIN is set. Binds only to 127.0.0.1 on
# OS-assigned or checked-free ports; stops every process and removes every file and
# iptables rule it created on exit. Needs root (iptables; installed if missing). After each
# run node B leaves the cluster (`cluster member remove`) before it stops.
set -euo pipefail

case "${1:-}" in
  -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
  '') ;;
  *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac
runs=${RUNS:-3}
root=$(cd "$(dirname "$0")/.." && pwd)

source "$root/scripts/bench/lib.sh"
install_missing rsync=rsync openssl=openssl iptables=iptables jq=jq
if [ -n "${CLUSTER_BIN:-}" ]; then
  bin=$CLUSTER_BIN
else
  echo "building cluster (cargo build --release)..."
  release_build "$root" --bin cluster
  bin=$target_dir/release/cluster
fi

work=$(mktemp -d -t cluster-bench-sync-XXXXXX)
pids=()
# Wire bytes: a chain of counters (no verdicts) that every packet leaving on loopback passes.
chain="cluster-bench-sync-$$"
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  iptables -D OUTPUT -o lo -j "$chain" 2>/dev/null || true
  iptables -F "$chain" 2>/dev/null || true
  iptables -X "$chain" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
iptables -N "$chain" && iptables -I OUTPUT -o lo -j "$chain" ||
  { echo "cannot add iptables counters (root needed): bytes on the wire are not measurable" >&2; exit 1; }
# count_port PORT: counts packets from and to PORT from now on.
count_port() {
  iptables -A "$chain" -p tcp --sport "$1"
  iptables -A "$chain" -p tcp --dport "$1"
}
# wire_bytes PORT: bytes of the packets from and to PORT since the last zero_counters.
wire_bytes() {
  iptables -L "$chain" -v -x -n | awk -v p="$1" '$0 ~ ("[sd]pt:" p "( |$)") { s += $2 } END { print s + 0 }'
}
zero_counters() { iptables -Z "$chain"; }
trap 'exit 130' INT
trap 'exit 143' TERM

now_ns() { date +%s%N; }
ms_since() { echo $(( ($(now_ns) - $1) / 1000000 )); }
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
json_num() { sed -n "s/.*\"$1\": *\([0-9][0-9]*\).*/\1/p" "$2" | head -n 1; }
json_str() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" "$2" | head -n 1; }

# Deterministic content: the AES-128-CTR keystream of a fixed key, one stream per seed (the
# seed is the high half of the counter block, so no two files share keystream).
key=000102030405060708090a0b0c0d0e0f
gen() { # gen FILE BYTES SEED
  head -c "$2" /dev/zero |
    openssl enc -aes-128-ctr -K "$key" -iv "$(printf '%016x%016x' "$3" 0)" >"$1"
}
rng=20240601
rand_below() { # sets r to a number in [0, $1)
  rng=$(( rng * 6364136223846793005 + 1442695040888963407 ))
  r=$(( ((rng >> 33) & 0x7fffffff) % $1 ))
}

# --- the trees --------------------------------------------------------------------------
base="$work/base"
echo "generating the base tree in $base..."
mkdir -p "$base/bin" "$base/lib"
seed=1
gen "$base/bin/cluster" $(( 20 * 1024 * 1024 )) $((seed++))
chmod 755 "$base/bin/cluster"
# 1,000 files: 800 small (1-32 KiB), 190 medium (64 KiB-1 MiB), 10 large (6-12 MiB).
for i in $(seq 0 999); do
  if [ "$i" -lt 10 ]; then
    rand_below $(( 6 * 1024 * 1024 )); size=$(( 6 * 1024 * 1024 + r ))
    path="lib/large-$i.so"
  elif [ "$i" -lt 200 ]; then
    rand_below $(( 960 * 1024 )); size=$(( 64 * 1024 + r ))
    path="share/medium/m-$(printf '%03d' "$i").bin"
  else
    rand_below $(( 31 * 1024 )); size=$(( 1024 + r ))
    path="share/small/d$(( i % 16 ))/s-$(printf '%03d' "$i").txt"
  fi
  mkdir -p "$base/$(dirname "$path")"
  gen "$base/$path" "$size" $((seed++))
done
# Fixed mtimes: the copies below keep them, so rsync's quick check can skip unchanged files.
find "$base" -exec touch -h -d @1700000000 {} +

rewritten=share/medium/m-100.bin
rewritten_size=$(stat -c %s "$base/$rewritten")
cases=(a b c)
declare -A label=(
  [a]="(a) 1 file rewritten ($(( rewritten_size / 1024 )) KiB)"
  [b]="(b) 1 KiB changed in bin/cluster"
  [c]="(c) bin/cluster replaced"
)
for c in "${cases[@]}"; do cp -a "$base" "$work/var-$c"; done
gen "$work/var-a/$rewritten" "$rewritten_size" 100001
gen "$work/patch" 1024 100002
dd if="$work/patch" of="$work/var-b/bin/cluster" bs=1024 seek=$(( 10 * 1024 )) count=1 \
  conv=notrunc status=none
gen "$work/var-c/bin/cluster" $(( 20 * 1024 * 1024 )) 100003
release_bytes=$(find "$base" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
echo "base: $(find "$base" -type f | wc -l) files, $release_bytes bytes"

# --- nodes ------------------------------------------------------------------------------
"$bin" tls init "$work/tls/ca" >/dev/null
"$bin" tls issue "$work/tls/operator" --ca "$work/tls/ca" --operator bench >/dev/null
export CLUSTER_TLS=$work/tls/operator

# start_node NAME ID [FLAG...]: starts node ID (a certificate of its own) in $work/NAME;
# sets node_pid and node_addr.
start_node() {
  local dir="$work/$1" id=$2 deadline=$(( $(date +%s) + 30 ))
  shift 2
  "$bin" tls issue "$work/tls/n$id" --ca "$work/tls/ca" --node "$id" >/dev/null
  "$bin" node run --id "$id" --listen 127.0.0.1:0 --data-dir "$dir" --tls "$work/tls/n$id" \
    "$@" >"$dir.log" 2>&1 &
  node_pid=$!
  pids+=("$node_pid")
  until [ -s "$dir/node.addr" ]; do
    if ! kill -0 "$node_pid" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
      echo "node $1 did not start; its log:" >&2; cat "$dir.log" >&2; exit 1
    fi
    sleep 0.05
  done
  node_addr=$(cat "$dir/node.addr")
}

# wait_member ID: until node A's leader view lists node ID following it.
wait_member() {
  local deadline=$(( $(date +%s) + 60 ))
  until "$bin" status --json --node "$a_addr" 2>/dev/null | jq -e --argjson id "$1" \
      '.nodes[] | select(.id == $id and (.state == "follower" or .state == "learner"))' >/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "node $1 did not join within 60 s" >&2; exit 1; }
    sleep 0.1
  done
}

# stop_node PID: SIGTERM, then wait up to 30 s for the graceful exit.
stop_node() {
  local deadline=$(( $(date +%s) + 30 ))
  kill -TERM "$1" 2>/dev/null || return 0
  while kill -0 "$1" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then kill -KILL "$1" 2>/dev/null || true; fi
    sleep 0.05
  done
  wait "$1" 2>/dev/null || true
  local kept=() pid
  for pid in "${pids[@]}"; do [ "$pid" = "$1" ] || kept+=("$pid"); done
  pids=("${kept[@]}")
}

start_node a 1 --bootstrap
a_addr=$node_addr
a_port=${a_addr##*:}
count_port "$a_port"
echo "node A at $a_addr"
declare -A hash
"$bin" dist push "$base" --node "$a_addr" --json >"$work/push-base.json"
base_hash=$(json_str hash "$work/push-base.json")
for c in "${cases[@]}"; do
  "$bin" dist push "$work/var-$c" --node "$a_addr" --json >"$work/push-$c.json"
  hash[$c]=$(json_str hash "$work/push-$c.json")
done

# --- rsync daemon -------------------------------------------------------------------------
conf="$work/rsyncd.conf"
{
  echo "use chroot = no"
  echo "uid = $(id -un)"
  echo "gid = $(id -gn)"
  for c in "${cases[@]}"; do
    printf '[%s]\n  path = %s\n  read only = yes\n' "$c" "$work/var-$c"
  done
} >"$conf"
# rsync cannot take an OS-assigned port: try random unprivileged ones until one binds.
rsync_port=
for _ in $(seq 1 20); do
  port=$(( 20000 + RANDOM % 40000 ))
  rsync --daemon --no-detach --address=127.0.0.1 --port="$port" --config="$conf" \
    --log-file="$work/rsyncd.log" &
  rsync_pid=$!
  deadline=$(( $(date +%s) + 10 ))
  while kill -0 "$rsync_pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
    if rsync --contimeout=2 --timeout=2 "rsync://127.0.0.1:$port/" >/dev/null 2>&1; then rsync_port=$port; break; fi
    sleep 0.05
  done
  if [ -n "$rsync_port" ]; then pids+=("$rsync_pid"); break; fi
  kill -TERM "$rsync_pid" 2>/dev/null || true
  wait "$rsync_pid" 2>/dev/null || true
done
[ -n "$rsync_port" ] || { echo "rsync daemon did not start:" >&2; cat "$work/rsyncd.log" >&2; exit 1; }
count_port "$rsync_port"
echo "rsync daemon at 127.0.0.1:$rsync_port"

# --- the runs -----------------------------------------------------------------------------
declare -A out
b_id=1
for c in "${cases[@]}"; do
  c_bytes=() c_man=() c_ms=() c_wire=() r_recv=() r_sent=() r_ms=() r_wire=()
  for run in $(seq 1 "$runs"); do
    b_id=$(( b_id + 1 ))
    start_node "b-$c-$run" "$b_id" --join "$a_addr"
    b_pid=$node_pid b_addr=$node_addr
    wait_member "$b_id"
    "$bin" dist fetch "$base_hash" --from "$a_addr" --node "$b_addr" --json >"$work/fetch-base.json" ||
      { echo "node B could not fetch the base:" >&2; cat "$work/fetch-base.json" >&2; exit 1; }
    zero_counters
    t0=$(now_ns)
    "$bin" dist fetch "${hash[$c]}" --from "$a_addr" --node "$b_addr" --json \
      >"$work/fetch-$c-$run.json" ||
      { echo "case $c: node B could not fetch:" >&2; cat "$work/fetch-$c-$run.json" >&2; exit 1; }
    c_ms+=("$(ms_since "$t0")")
    c_wire+=("$(wire_bytes "$a_port")")
    c_bytes+=("$(json_num fetched_bytes "$work/fetch-$c-$run.json")")
    c_man+=("$(json_num manifest_bytes "$work/fetch-$c-$run.json")")
    c_node_ms=$(json_num elapsed_ms "$work/fetch-$c-$run.json")
    got=$(json_str hash "$work/fetch-$c-$run.json")
    [ "$got" = "${hash[$c]}" ] || { echo "case $c: node B holds $got, not ${hash[$c]}" >&2; exit 1; }
    "$bin" member remove "$b_id" --node "$a_addr" >/dev/null
    stop_node "$b_pid"
    rm -rf "$work/b-$c-$run"

    dest="$work/dest"
    rm -rf "$dest"
    cp -a "$base" "$dest"
    zero_counters
    t0=$(now_ns)
    rsync -a --delete --stats "rsync://127.0.0.1:$rsync_port/$c/" "$dest/" >"$work/rsync-$c-$run.txt"
    r_ms+=("$(ms_since "$t0")")
    r_wire+=("$(wire_bytes "$rsync_port")")
    r_recv+=("$(sed -n 's/^Total bytes received: \([0-9,]*\).*/\1/p' "$work/rsync-$c-$run.txt" | tr -d ,)")
    r_sent+=("$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' "$work/rsync-$c-$run.txt" | tr -d ,)")
    if [ "$run" = 1 ] && ! diff -r "$work/var-$c" "$dest" >/dev/null; then
      echo "case $c: rsync's copy differs from the variant" >&2; exit 1
    fi
    echo "  case $c run $run: cluster ${c_wire[-1]} B on the wire (${c_bytes[-1]} B of chunks)" \
      "in ${c_ms[-1]} ms (${c_node_ms} ms on node B); rsync ${r_wire[-1]} B on the wire" \
      "(${r_recv[-1]} B received + ${r_sent[-1]} B sent) in ${r_ms[-1]} ms" >&2
  done
  whole=$(stat -c %s "$work/a/manifests/${hash[$c]}.json")
  out[$c]="$(median "${c_bytes[@]}") $(median "${c_ms[@]}") $(median "${r_recv[@]}") $(median "${r_sent[@]}") $(median "${r_ms[@]}") $(median "${c_man[@]}") $(median "${c_wire[@]}") $(median "${r_wire[@]}") $whole"
done

# --- the table ------------------------------------------------------------------------------
mb() { awk -v b="$1" 'BEGIN { printf (b >= 1e6 ? "%.1f MB" : "%.3f MB"), b / 1e6 }'; }
echo
echo "Release sync over loopback, $(nproc) cores, median of $runs runs:"
echo
echo "| case | release size | cluster on the wire | cluster ms | rsync on the wire | rsync ms | ratio | cluster: chunks + manifest (whole) | rsync: received + sent |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for c in "${cases[@]}"; do
  read -r cb cms rr rs rms man cw rw whole <<<"${out[$c]}"
  ratio=$(awk -v a="$cw" -v b="$rw" 'BEGIN { printf "%.2f", a / b }')
  echo "| ${label[$c]} | $(mb "$release_bytes") | $(mb "$cw") | $cms | $(mb "$rw") | $rms |" \
    "$ratio | $(mb "$cb") + $(mb "$man") ($(mb "$whole")) | $(mb "$rr") + $(mb "$rs") |"
done
echo
echo "on the wire: every IP packet to or from node A's port (cluster) or the rsync daemon's"
echo "(rsync) during the step, counted by iptables on loopback: manifest, TLS, HTTP/2 and TCP/IP"
echo "headers included; ratio: cluster / rsync on the wire. Beside them what each says it"
echo "moved: the chunk bytes node B fetched plus the manifest bytes it fetched, a delta against"
echo "the base it holds (in brackets: the whole manifest as node A stores it, JSON); rsync's"
echo "Total bytes received + sent. cluster ms includes verifying every byte of the release on"
echo "node B; rsync verifies nothing end to end."
