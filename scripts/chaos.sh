#!/usr/bin/env bash
# Runs the seeded chaos suite (tests/chaos/main.rs) and writes RELIABILITY.md from its
# report: trials, acknowledged writes, lost writes, concurrent kv operations and whether
# their history was linearizable, stuck rollouts, unbootable nodes, silent mixed versions
# and panics, per nemesis.
#
#   scripts/chaos.sh --trials 300            # a long pass (about 20 s per trial)
#   scripts/chaos.sh --trials 20 --seed 7    # from a chosen first seed
#   scripts/chaos.sh --seeds 105:PauseUpdating,212   # exactly these trials again (S:Nemesis pins the fault)
#   scripts/chaos.sh --out FILE              # write FILE instead of RELIABILITY.md
#   scripts/chaos.sh --trials 300 --jobs 2   # two test processes at once, half the trials each
#
# Needs root (network namespaces for partitions, tmpfs for a full disk); installs jq and
# faketime with apt-get when missing. Exits non-zero when any trial broke a promise, after
# writing the report (each failure names its seed).
set -euo pipefail
cd "$(dirname "$0")/.."

trials=20 seed='' seeds='' out=RELIABILITY.md jobs=1
while [ $# -gt 0 ]; do
  case "$1" in
    --trials) trials=${2:?--trials needs a number}; shift 2 ;;
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    --seeds) seeds=${2:?--seeds needs a list}; shift 2 ;;
    --out) out=${2:?--out needs a file}; shift 2 ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$trials" =~ ^[1-9][0-9]*$ ]] || { echo "--trials must be a positive number" >&2; exit 2; }
[ -z "$seed" ] || [[ "$seed" =~ ^[0-9]+$ ]] || { echo "--seed must be a number" >&2; exit 2; }
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "--jobs must be a positive number" >&2; exit 2; }
[ -z "$seeds" ] || [ "$jobs" = 1 ] || { echo "--seeds runs in one job: drop --jobs" >&2; exit 2; }

missing=()
command -v jq >/dev/null || missing+=(jq)
command -v faketime >/dev/null || missing+=(faketime)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "${missing[*]} missing (apt-get install ${missing[*]})" >&2; exit 2; }
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" </dev/null
fi
: "${seed:=$(date +%s)}"
report=$(mktemp)
logs=$(mktemp -d)
trap 'rm -rf "$report" "$logs"' EXIT
started=$(date +%s)
status=0
cargo build --locked --features crash-points --tests --quiet
# Job j runs trials seed + j*per ... of its own; every job appends to one report (a line
# per trial, written whole).
per=$(( (trials + jobs - 1) / jobs ))
for ((j = 0; j < jobs; j++)); do
  count=$(( trials - j * per < per ? trials - j * per : per ))
  [ "$count" -gt 0 ] || break
  env CHAOS_TRIALS="$count" CHAOS_SEED=$(( seed + j * per )) ${seeds:+CHAOS_SEEDS="$seeds"} \
    CHAOS_REPORT="$report" cargo test --locked --features crash-points --test chaos -- --nocapture \
    >"$logs/$j" 2>&1 &
done
tail -q -n +1 -f "$logs"/* --pid=$$ 2>/dev/null | grep --line-buffered -E '^chaos:|rerun:' &
wait $(jobs -p | head -n -1) || true
for log in "$logs"/*; do
  grep -q 'test result: ok' "$log" || { status=1; grep -A3 'VIOLATED\|panicked' "$log" | head -40 >&2; }
done
# A failed trial's node logs, kept for a look.
[ "$status" = 0 ] || { mkdir -p target/chaos-logs; cp "$logs"/* target/chaos-logs/; echo "full output: target/chaos-logs/" >&2; }
elapsed=$(( $(date +%s) - started ))
[ -s "$report" ] || { echo "no trial ran; the test's output:" >&2; tail -50 "$log" >&2; exit 1; }

{
  echo "# Reliability"
  echo
  echo "Written by \`scripts/chaos.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') ($elapsed s) from"
  echo "$(jq -s length "$report") trials of \`tests/chaos/main.rs\` (seeds $(jq -s 'map(.seed) | min' "$report")"
  echo "to $(jq -s 'map(.seed) | max' "$report"); cluster $(git rev-parse --short HEAD), debug build, 2 cores, $jobs test process(es) at once)."
  echo "Each trial: ${CHAOS_NODES:-3} supervised nodes, a rolling update with a 1.5 s stabilization"
  echo "window, a sequential kv writer and $(grep -oP 'CLIENTS: u64 = \K[0-9]+' tests/chaos/history.rs) concurrent kv clients throughout, one fault at"
  echo "a random moment; then every check of the suite. \"writes acknowledged\" are the sequential"
  echo "writer's, each read back; \"concurrent ops\" are the operations of the concurrent clients"
  echo "that returned, whose history stateright's linearizability checker decides. Rerun one:"
  echo "\`CHAOS_SEEDS=<seed>:<nemesis> cargo test --features crash-points --test chaos -- --nocapture\`."
  echo
  echo "| nemesis | trials | completed | reverted | failed | aborted | writes acknowledged | lost | concurrent ops | not linearizable | stuck | unbootable | silent mixed | panics | violations |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  jq -rs 'group_by(.nemesis)[] | [
      .[0].nemesis, length,
      (map(select(.rollout == "completed")) | length),
      (map(select(.rollout == "reverted")) | length),
      (map(select(.rollout == "failed")) | length),
      (map(select(.rollout == "aborted")) | length),
      (map(.acked) | add), (map(.lost) | add),
      (map(.ops) | add), (map(select(.ops > 0 and (.linearizable | not))) | length),
      (map(select(.stuck)) | length), (map(.unbootable) | add),
      (map(select(.silent_mixed)) | length), (map(.panics) | add),
      (map(select(.violations | length > 0)) | length)
    ] | "| " + (map(tostring) | join(" | ")) + " |"' "$report"
  jq -rs '[length, (map(select(.rollout == "completed")) | length),
      (map(select(.rollout == "reverted")) | length), (map(select(.rollout == "failed")) | length),
      (map(select(.rollout == "aborted")) | length), (map(.acked) | add), (map(.lost) | add),
      (map(.ops) | add), (map(select(.ops > 0 and (.linearizable | not))) | length),
      (map(select(.stuck)) | length), (map(.unbootable) | add),
      (map(select(.silent_mixed)) | length), (map(.panics) | add),
      (map(select(.violations | length > 0)) | length)]
    | "| **all** | " + (map(tostring) | join(" | ")) + " |"' "$report"
  echo
  if jq -se 'any(.violations | length > 0)' "$report" >/dev/null; then
    echo "## Violations"
    echo
    jq -rs '.[] | select(.violations | length > 0) |
      "- seed \(.seed) (\(.nemesis): \(.fault)): \(.violations | join("; "))"' "$report"
  else
    echo "No trial broke a promise."
  fi
} >"$out"
echo "wrote $out"
exit $status
