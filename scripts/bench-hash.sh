#!/usr/bin/env bash
# Measures how fast `cluster dist stamp` hashes a dist, against plain SHA-256 tools over the
# same files: `openssl dgst -sha256` and `sha256sum`, each as one process fed by
# `find -print0 | xargs -0` (and, for reference, openssl as two processes, since stamp uses
# every core). `dist stamp` computes what either does (a SHA-256 of every file, on every
# core) plus the build hash; the FastCDC chunks a release sync needs are computed by
# `dist push`, `update` and `install`, not by `stamp`.
#
# The dist (SIZE_MIB in total, default 1024) is generated deterministically in a temp dir:
# many small files (1-64 KiB, 1/8 of the bytes), some medium ones (1-8 MiB, 3/8) and four
# large ones (1/8 each, one of them bin/cluster). The page cache is warmed once and nothing
# is dropped; each measurement is the median of RUNS runs (default 3), the tools taking
# turns within each run. Besides wall time and MiB/s it reports CPU seconds (user +
# system of all processes), which other load on a shared machine disturbs less.
#
#   scripts/bench-hash.sh           # 1 GiB
#   scripts/bench-hash.sh 256       # 256 MiB
#   CLUSTER_BIN=path/to/cluster RUNS=5 scripts/bench-hash.sh
#
# Builds the release cluster binary unless CLUSTER_BIN is set; installs openssl and coreutils
# with apt-get if they are missing. Everything it creates is removed on exit.
set -euo pipefail

size_mib=${1:-1024}
runs=${RUNS:-3}
case "$size_mib" in
  -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
  ''|*[!0-9]*) echo "SIZE_MIB must be a whole number of MiB (see --help)" >&2; exit 2 ;;
esac
[ "$size_mib" -ge 16 ] || { echo "SIZE_MIB must be at least 16" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)

source "$root/scripts/bench/lib.sh"
install_missing openssl=openssl sha256sum=coreutils
if [ -n "${CLUSTER_BIN:-}" ]; then
  bin=$CLUSTER_BIN
else
  echo "building cluster (cargo build --release)..."
  release_build "$root" --bin cluster
  bin=$target_dir/release/cluster
fi

work=$(mktemp -d -t cluster-bench-hash-XXXXXX)
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Deterministic content: the AES-128-CTR keystream of a fixed key, one stream per file
# (the seed is the high half of the counter block, so no two files share keystream).
key=000102030405060708090a0b0c0d0e0f
gen() { # gen FILE BYTES SEED
  head -c "$2" /dev/zero |
    openssl enc -aes-128-ctr -K "$key" -iv "$(printf '%016x%016x' "$3" 0)" >"$1"
}

# Deterministic sizes: a 64-bit LCG.
rng=20240601
rand_below() { # sets r to a number in [0, $1)
  rng=$(( rng * 6364136223846793005 + 1442695040888963407 ))
  r=$(( ((rng >> 33) & 0x7fffffff) % $1 ))
}

dist="$work/dist"
total=$(( size_mib * 1024 * 1024 ))
echo "generating a ${size_mib} MiB dist in $dist..."
mkdir -p "$dist/bin" "$dist/lib" "$dist/share/medium"
seed=1
large=$(( total / 8 ))
gen "$dist/bin/cluster" "$large" $((seed++))
chmod 755 "$dist/bin/cluster"
for i in 1 2 3; do gen "$dist/lib/large-$i.bin" "$large" $((seed++)); done

budget=$(( total * 3 / 8 )); i=0
while [ "$budget" -gt 0 ]; do
  rand_below $(( 7 * 1024 * 1024 )); size=$(( 1024 * 1024 + r ))
  [ "$size" -le "$budget" ] || size=$budget
  gen "$dist/share/medium/m-$(printf '%04d' $i).bin" "$size" $((seed++))
  budget=$(( budget - size )); i=$(( i + 1 ))
done
medium_files=$i

budget=$(( total - 4 * large - total * 3 / 8 )); i=0
while [ "$budget" -gt 0 ]; do
  rand_below $(( 63 * 1024 )); size=$(( 1024 + r ))
  [ "$size" -le "$budget" ] || size=$budget
  sub="$dist/share/small/d$(printf '%02d' $(( i % 64 )))"
  [ -d "$sub" ] || mkdir -p "$sub"
  gen "$sub/s-$(printf '%05d' $i).dat" "$size" $((seed++))
  budget=$(( budget - size )); i=$(( i + 1 ))
done
small_files=$i

files_list="$work/files"
(cd "$dist" && find . -type f ! -path ./version.json -print0) >"$files_list"
file_count=$(tr -cd '\0' <"$files_list" | wc -c)
bytes=$(cd "$dist" && xargs -0 stat -c %s <"$files_list" | awk '{ s += $1 } END { print s }')
echo "dist: $file_count files ($small_files small, $medium_files medium, 4 large), $bytes bytes"

echo "warming the page cache..."
(cd "$dist" && xargs -0 cat <"$files_list" >/dev/null)

# time_once COMMAND...: runs COMMAND once; sets wall and cpu (user + system, of every
# process it ran: less sensitive to other load on the machine).
time_once() {
  local TIMEFORMAT='%R %U %S' real user sys
  { time "$@" >/dev/null 2>"$work/stderr"; } 2>"$work/time"
  read -r real user sys <"$work/time"
  wall=$real
  cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.3f", u + s }')
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

openssl_1() ( cd "$dist" && xargs -0 openssl dgst -sha256 <"$files_list" )
# Two halves of equal weight (largest first, dealt alternately), one process each.
# (The generated names have no spaces or newlines.)
(cd "$dist" && find . -type f ! -path ./version.json -printf '%s %p\n') |
  sort -rn | cut -d' ' -f2- | awk -v a="$work/half-0" -v b="$work/half-1" \
    '{ print > (NR % 2 ? a : b) }'
openssl_2() (
  cd "$dist"
  xargs -d '\n' openssl dgst -sha256 <"$work/half-0" &
  xargs -d '\n' openssl dgst -sha256 <"$work/half-1"
  wait $!
)
sha256sum_1() ( cd "$dist" && xargs -0 sha256sum <"$files_list" )

echo "measuring (median of $runs; the tools take turns within each run, so a change in the"
echo "machine's other load falls on all of them alike)..."
names=("cluster dist stamp" "openssl dgst -sha256" "sha256sum" "openssl dgst -sha256, 2 processes")
commands=("$bin dist stamp $dist" openssl_1 sha256sum_1 openssl_2)
declare -A walls cpus
for _ in $(seq 1 "$runs"); do
  for k in "${!names[@]}"; do
    # shellcheck disable=SC2086 # the stamp command is words on purpose
    time_once ${commands[$k]}
    walls[$k]+=" $wall"; cpus[$k]+=" $cpu"
  done
done
medians=() cpu_medians=()
for k in "${!names[@]}"; do
  # shellcheck disable=SC2086
  medians+=("$(median ${walls[$k]})"); cpu_medians+=("$(median ${cpus[$k]})")
  printf '  %-36s wall:%s s   cpu:%s s\n' "${names[$k]}" "${walls[$k]}" "${cpus[$k]}" >&2
done

mibs() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.0f", b / 1048576 / s }'; }
cluster_mibs=$(mibs "${medians[0]}")
echo
echo "Hashing a $(( bytes / 1048576 )) MiB dist ($file_count files), $(nproc) cores," \
  "load average $(cut -d' ' -f1-3 /proc/loadavg), page cache warm, median of $runs:"
echo
echo "| tool | wall s | MiB/s | cluster stamp / tool | CPU s | MiB per CPU-s |"
echo "|---|---:|---:|---:|---:|---:|"
for k in "${!names[@]}"; do
  rate=$(mibs "${medians[$k]}")
  ratio=$(awk -v c="$cluster_mibs" -v t="$rate" 'BEGIN { printf "%.2fx", c / t }')
  echo "| ${names[$k]} | ${medians[$k]} | $rate | $ratio | ${cpu_medians[$k]} | $(mibs "${cpu_medians[$k]}") |"
done
