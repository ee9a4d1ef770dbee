#!/usr/bin/env bash
# The production install under a real systemd: three systemd-nspawn containers each boot
# systemd 252 (Debian bookworm, built once by tests/nspawn/rootfs.sh), share the host's
# network, and run the README's "Production install" block line by line (10.0.0.N:7100 ->
# 127.0.0.1:<free port>, /tmp/cluster-dist* -> the test's dists): the CA and every
# certificate are made here, on the build host, each container gets its own node directory
# and the operator's (the README's `scp -r`), and every node runs with mutual TLS. A
# plaintext client is refused where the operator's certificate is served. Then a release
# whose binary exits 1 (and then one that crash-loops) is rolled out, the leader and the
# third node are killed once the first follower has activated it, and the follower's boot
# guard must undo it under systemd with no leader anywhere. Every client command runs with
# the operator's credentials (CLUSTER_TLS).
#
#   tests/nspawn/run.sh          # as root; skips (exit 0) saying why where it cannot run
#
# Environment: CLUSTER_BUILD_PROFILE (passed to scripts/build-dist.sh; default release),
# CLUSTER_TEST_CACHE (where the bookworm root is cached; default /var/cache/cluster-test),
# KEEP=1 (keep the work dir).
#
# Each container runs in cgroups of its own under /sys/fs/cgroup/<controller>/ (never the
# host's: a systemd manager adopts the cgroup it starts in), is driven with
# `nsenter -t <its systemd> -a`, and is stopped with `systemctl poweroff`. The trap stops
# containers, removes their cgroups and the work dir even when a check fails.
set -euo pipefail

skip() { echo "SKIPPED: tests/nspawn/run.sh: $*"; exit 0; }
# A missing tool skips outside CI; under CI (CI set, and not 0 or false) it fails: CI must
# run this, and .ci/run installs the tools as root.
missing_tool() {
  case "${CI:-}" in '' | 0 | false | FALSE | False) skip "$*" ;; esac
  echo "FAILED: tests/nspawn/run.sh: $*: under CI=$CI a missing tool fails instead of skipping" >&2
  exit 1
}
[ "$(id -u)" = 0 ] || skip "needs root (systemd-nspawn boots containers)"
for tool in systemd-nspawn debootstrap nsenter jq wrk curl; do
  command -v "$tool" >/dev/null || missing_tool "$tool is missing (apt-get install systemd-container debootstrap jq wrk curl)"
done
[ -d /sys/fs/cgroup ] || skip "no /sys/fs/cgroup"

# The cgroup hierarchies a container gets a cgroup of its own in: the one unified tree,
# or every mounted v1 (and hybrid) hierarchy.
if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
  hierarchies=(/sys/fs/cgroup/)
else
  mapfile -t hierarchies < <(awk '($3 == "cgroup" || $3 == "cgroup2") && $2 ~ "^/sys/fs/cgroup/" { print $2 "/" }' /proc/mounts)
fi
[ ${#hierarchies[@]} -gt 0 ] || skip "no cgroup hierarchy is mounted under /sys/fs/cgroup"

repo=$(cd "$(dirname "$0")/../.." && pwd)
rootfs=$("$repo/tests/nspawn/rootfs.sh")
work=$(mktemp -d /tmp/cluster-nspawn-XXXXXX)
tag=cluster-nspawn-$$
declare -A pid1=() nspawn=() port=()
bg_update=''
started=$(date +%s)

log() { echo "[nspawn $(($(date +%s) - started))s] $*"; }

fail() {
  echo "FAILED: $*" >&2
  for n in 1 2 3; do
    [ -n "${pid1[$n]:-}" ] || continue
    echo "--- container $n: journalctl -u cluster (last 40 lines) ---" >&2
    in_c "$n" journalctl -u cluster --no-pager -n 40 >&2 || true
  done
  exit 1
}

cleanup() {
  local status=$?
  [ -z "$bg_update" ] || kill "$bg_update" 2>/dev/null || true
  for n in "${!nspawn[@]}"; do
    if kill -0 "${nspawn[$n]}" 2>/dev/null; then
      timeout 10 nsenter -t "${pid1[$n]}" -a systemctl poweroff >/dev/null 2>&1 || true
    fi
  done
  for n in "${!nspawn[@]}"; do
    for _ in $(seq 1 150); do kill -0 "${nspawn[$n]}" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "${nspawn[$n]}" 2>/dev/null; then
      echo "container $n did not power off: killing it" >&2
      kill -KILL "${nspawn[$n]}" 2>/dev/null || true
    fi
  done
  for n in 1 2 3; do
    for hierarchy in "${hierarchies[@]}"; do
      local cg=$hierarchy$tag-$n
      [ -d "$cg" ] || continue
      # Anything left in it (a stuck container) is killed before the cgroup goes.
      find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
      for _ in $(seq 1 50); do
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [ -d "$cg" ] || break
        sleep 0.1
      done
      [ ! -d "$cg" ] || echo "could not remove cgroup $cg" >&2
    done
  done
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'echo "interrupted: cleaning up" >&2; exit 130' INT TERM

# Runs a command in container <n> (all its namespaces, a clean environment). In the
# background with `wait`, so an interrupt runs the cleanup at once.
in_c() {
  local n=$1; shift
  timeout 300 nsenter -t "${pid1[$n]}" -a \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@" </dev/null &
  wait $!
}
# A container's file, read from the host.
c_path() { echo "/proc/${pid1[$1]}/root$2"; }

# A port free now and unlikely to be taken before a node binds it, minutes later
# (install.sh needs a fixed port): below the kernel's ephemeral range, which every
# port-0 bind and outgoing connection on the host draws from.
free_port() {
  local p ephemeral_low
  read -r ephemeral_low _ </proc/sys/net/ipv4/ip_local_port_range
  [ "$ephemeral_low" -gt 11000 ] || fail "the ephemeral port range starts at $ephemeral_low: no room below it"
  while :; do
    p=$(shuf -i "10000-$((ephemeral_low - 1))" -n 1)
    [ -n "$(ss -Hltn "sport = :$p")" ] || { echo "$p"; return; }
  done
}

# Boots container <n> in cgroups of its own.
boot() {
  local n=$1 hierarchy cg
  for hierarchy in "${hierarchies[@]}"; do
    cg=$hierarchy$tag-$n
    mkdir "$cg"
    # A v1 cpuset cgroup takes no task before it has cpus and mems.
    if [ -f "$hierarchy/cpuset.cpus" ]; then
      cat "$hierarchy/cpuset.cpus" >"$cg/cpuset.cpus"
      cat "$hierarchy/cpuset.mems" >"$cg/cpuset.mems"
    fi
  done
  (
    for hierarchy in "${hierarchies[@]}"; do echo "$BASHPID" >"$hierarchy$tag-$n/cgroup.procs"; done
    exec systemd-nspawn -D "$rootfs" -M "$tag-$n" -b --volatile=overlay --register=no \
      --keep-unit --console=passive \
      --bind-ro="$repo/scripts:/opt/cluster/scripts" \
      --bind-ro="$repo/systemd:/opt/cluster/systemd" \
      --bind-ro="$work/dists:/opt/dists"
  ) >"$work/console-$n.log" 2>&1 &
  nspawn[$n]=$!
  local child=''
  for _ in $(seq 1 100); do
    child=$(cat "/proc/${nspawn[$n]}/task/${nspawn[$n]}/children" 2>/dev/null || true)
    [ -n "$child" ] && [ "$(cat "/proc/${child%% *}/comm" 2>/dev/null)" = systemd ] && break
    sleep 0.1
  done
  [ -n "$child" ] || fail "container $n did not start: $(cat "$work/console-$n.log")"
  pid1[$n]=${child%% *}
  # Until systemd listens, systemctl cannot connect at all (it prints nothing, or
  # "offline"); then it says how boot went. A loaded machine can take a while.
  local state=''
  for _ in $(seq 1 600); do
    state=$(in_c "$n" systemctl is-system-running 2>/dev/null || true)
    case "$state" in initializing|starting|offline|'') sleep 0.1 ;; *) break ;; esac
  done
  [ "$state" = running ] || fail "container $n booted '$state': $(in_c "$n" systemctl --failed --no-pager)"
}

mkdir -p "$work/dists" "$work/tls" "$work/extra-2/share/cluster"
echo "the second build" >"$work/extra-2/share/cluster/NOTES"
for n in 1 2 3; do port[$n]=$(free_port); done
log "booting 3 containers from $rootfs"
for n in 1 2 3; do boot "$n"; done
log "booted: systemd pids ${pid1[1]} ${pid1[2]} ${pid1[3]}; ports ${port[1]} ${port[2]} ${port[3]}"

map_addresses() {
  local line=$1 n
  for n in 1 2 3; do line=${line//10.0.0.$n:7100/127.0.0.1:${port[$n]}}; done
  echo "$line"
}

# The README's block, line by line: "# build host" lines run here, "# host N" lines in
# container N, "# any host" lines in every container.
readme_block=$(sed -n '/^<!-- production-install: tests/,/^<!-- production-install: end/p' "$repo/README.md" |
  sed -n '/^```sh$/,/^```$/p' | sed '1d;$d')
[ -n "$readme_block" ] || fail "README.md has no production-install block"
context='' builds=0
declare -A main_pid_before=()
while IFS= read -r line; do
  case "$line" in
    '# build host'*) context=build; continue ;;
    '# any host'*) context=any; continue ;;
    '# host '[0-9]*) context=${line#\# host }; context=${context%%[^0-9]*}; continue ;;
    '#'*|'') continue ;;
  esac
  line=$(map_addresses "${line#sudo }")
  case "$context" in
    build)
      # The build host's CA and credentials live in $work/tls (before the dists: $work
      # itself starts with /tmp/cluster-).
      for name in cluster-ca cluster-node- cluster-ops; do line=${line//\/tmp\/$name/$work/tls/$name}; done
      line=${line//\/tmp\/cluster-dist/$work/dists/cluster-dist}
      # `scp -r <dir>... 10.0.0.N:<dir>`: copied into container N's own file system.
      if [[ "$line" =~ ^scp\ -r\ (.+)\ 10\.0\.0\.([1-3]):(/[^ ]*)$ ]]; then
        n=${BASH_REMATCH[2]} dest=${BASH_REMATCH[3]}
        log "build host: $line"
        for src in ${BASH_REMATCH[1]}; do
          cp -r "$src" "$(c_path "$n" "$dest")" || fail "$line: copying $src into container $n"
        done
        continue
      fi
      if [[ "$line" == *"cluster tls "* ]]; then
        log "build host: $line"
        (cd "$repo" && bash -c "$line") </dev/null >"$work/tls.log" 2>&1 || fail "$line: $(cat "$work/tls.log")"
        continue
      fi
      builds=$((builds + 1))
      log "build host: $line"
      # The second build ships one more file, as a later checkout would differ.
      extra=''
      [ "$builds" -lt 2 ] || extra=$work/extra-2
      (cd "$repo" && CLUSTER_DIST_EXTRA=$extra bash -c "$line") </dev/null >"$work/build-$builds.log" 2>&1 &
      wait $! ||
        fail "$line: $(tail -20 "$work/build-$builds.log")"
      if [ "$builds" -ge 2 ]; then
        # A later checkout builds another binary; this one is the same source, so its
        # bin/cluster gets bytes of its own (an ELF runs with trailing bytes), and the
        # nodes restart into it as they would into a real new build.
        dist=${line##* }
        printf '\n# build %s\n' "$builds" >>"$dist/bin/cluster"
        "$dist/bin/cluster" dist stamp "$dist" >/dev/null || fail "restamping $dist"
      fi
      ;;
    any|[0-9])
      line=${line//\/tmp\/cluster-dist//opt/dists/cluster-dist}
      hosts=$context
      [ "$context" != any ] || hosts='1 2 3'
      if [[ "$line" == *"cluster update "* ]]; then
        for n in 1 2 3; do
          main_pid_before[$n]=$(in_c "$n" systemctl show -p MainPID --value cluster)
        done
      fi
      for n in $hosts; do
        log "host $n: $line"
        in_c "$n" sh -c "cd /opt/cluster && $line" >"$work/host-$n.out" 2>&1 ||
          fail "host $n: $line: $(tail -30 "$work/host-$n.out")"
        tail -5 "$work/host-$n.out" | sed 's/^/    /'
      done
      ;;
    *) fail "README line outside a host context: $line" ;;
  esac
done <<<"$readme_block"

hash2=$(jq -r .buildHash "$work/dists/cluster-dist-2/version.json")
hash1=$(jq -r .buildHash "$work/dists/cluster-dist/version.json")
[ "$hash1" != "$hash2" ] || fail "the two builds have the same hash"
cli=$work/dists/cluster-dist-2/bin/cluster
# Every client command from here on runs as the operator the README's block issued.
export CLUSTER_TLS=$work/tls/cluster-ops
status_json() { "$cli" status --json --node "127.0.0.1:${port[1]}"; }
status=$(status_json)
[ "$(jq '[.nodes[] | select(.role == "voter")] | length' <<<"$status")" = 3 ] || fail "not 3 voters: $status"
[ "$(jq '[.nodes[] | select(.insecure == false)] | length' <<<"$status")" = 3 ] ||
  fail "not every node runs with TLS: $status"
[ "$(jq --arg h "$hash2" '[.nodes[] | select(.build_hash == $h and .supervision == "systemd")] | length' <<<"$status")" = 3 ] ||
  fail "not every node runs $hash2 under systemd: $status"
for n in 1 2 3; do
  show=$(in_c "$n" systemctl show -p NRestarts,MainPID cluster)
  restarts=$(sed -n 's/^NRestarts=//p' <<<"$show")
  main_pid=$(sed -n 's/^MainPID=//p' <<<"$show")
  [ "$restarts" = 1 ] || fail "host $n: restarted $restarts times for the update, not once ($show)"
  [ "$main_pid" != 0 ] && [ "$main_pid" != "${main_pid_before[$n]}" ] ||
    fail "host $n: MainPID $main_pid (before the update ${main_pid_before[$n]})"
  journal=$(in_c "$n" journalctl -u cluster --no-pager)
  for expected in "supervision=systemd" "restarting: exiting for the supervisor" \
    "starting pending release $hash2"; do
    grep -qF "$expected" <<<"$journal" || fail "host $n: the journal lacks \"$expected\""
  done
done
log "update: 3 nodes on ${hash2:0:12}, each restarted once by systemd (NRestarts=1, new MainPID)"

# The credentials install.sh copied: readable by the service user, by nobody else.
for n in 1 2 3; do
  modes=$(in_c "$n" stat -c '%n %a %U:%G' /etc/cluster/tls /etc/cluster/tls/ca.pem \
    /etc/cluster/tls/cert.pem /etc/cluster/tls/key.pem) || fail "host $n: no /etc/cluster/tls"
  expected="/etc/cluster/tls 750 root:cluster
/etc/cluster/tls/ca.pem 644 root:cluster
/etc/cluster/tls/cert.pem 644 root:cluster
/etc/cluster/tls/key.pem 640 root:cluster"
  [ "$modes" = "$expected" ] || fail "host $n: /etc/cluster/tls is not as install.sh makes it: $modes"
  grep -qx 'tls = "/etc/cluster/tls"' "$(c_path "$n" /etc/cluster/node.toml)" ||
    fail "host $n: node.toml does not name /etc/cluster/tls: $(cat "$(c_path "$n" /etc/cluster/node.toml)")"
done
# A plaintext client gets nothing from a node; the operator's certificate does.
for n in 1 2 3; do
  if plain=$(env -u CLUSTER_TLS "$cli" status --insecure --node "127.0.0.1:${port[$n]}" 2>&1); then
    fail "host $n answered a plaintext client: $plain"
  fi
  "$cli" status --node "127.0.0.1:${port[$n]}" >/dev/null || fail "host $n refused the operator's certificate"
done
log "TLS: every node on its own certificate (key.pem 0640 root:cluster); a plaintext client is refused: ${plain%%$'\n'*}"

# install.sh again with the same flags: nothing changes, the node keeps running.
pid_before=$(in_c 2 systemctl show -p MainPID --value cluster)
again=$(in_c 2 sh -c "cd /opt/cluster && scripts/install.sh --dist /opt/dists/cluster-dist --id 2 \
  --tls /tmp/cluster-node-2 --listen 127.0.0.1:${port[2]} --join 127.0.0.1:${port[1]}") ||
  fail "install.sh again: $again"
for expected in "user cluster exists" "/etc/cluster/node.toml is up to date" \
  "/etc/cluster/tls is up to date" "/etc/cluster/tls/key.pem is up to date" \
  "/etc/systemd/system/cluster.service is up to date" "already runs release $hash2"; do
  grep -qF "$expected" <<<"$again" || fail "install.sh again does not say \"$expected\": $again"
done
if grep -q '^wrote ' <<<"$again"; then fail "install.sh again wrote a file: $again"; fi
[ "$(in_c 2 systemctl show -p MainPID --value cluster)" = "$pid_before" ] ||
  fail "install.sh again restarted the node"
log "install.sh again: nothing changed, node 2 kept running"

# Rolls out the bad release in $work/dists/<name>; the moment a follower has activated it,
# kills the leader and the third node (their units stopped) and crashes the follower's
# node: alone, with no leader possible, its boot guard must put the good release back.
undone_with_no_leader() {
  local name=$1 bad leader updated='' bystander restarts_before restarts_after t0 n state
  bad=$("$cli" dist stamp "$work/dists/$name")
  wait_for_no_rollout
  leader=$(status_json | jq -r .leader)
  "$cli" update --dist "$work/dists/$name" --node "127.0.0.1:${port[$leader]}" \
    --health-deadline-ms 30000 >"$work/$name-update.log" 2>&1 &
  bg_update=$!
  log "$name: rolling out ${bad:0:12} through leader $leader"
  for _ in $(seq 1 600); do
    for n in 1 2 3; do
      [ "$n" != "$leader" ] || continue
      if [ -e "$(c_path "$n" /var/lib/cluster/boot.json)" ] &&
        [ "$(basename "$(readlink "$(c_path "$n" /var/lib/cluster/current)")")" = "$bad" ]; then
        updated=$n
        break 2
      fi
    done
    sleep 0.1
  done
  [ -n "$updated" ] || fail "$name: no follower activated it: $(cat "$work/$name-update.log")"
  bystander=$((6 - leader - updated))
  restarts_before=$(in_c "$updated" systemctl show -p NRestarts --value cluster)
  for n in "$leader" "$bystander"; do
    in_c "$n" sh -c 'systemctl kill -s KILL cluster; systemctl stop cluster'
  done
  # The leader may have died before it told the node to restart: the node crashes instead.
  in_c "$updated" systemctl kill -s KILL cluster || true
  log "$name: killed leader $leader and node $bystander; node $updated alone on ${bad:0:12}"
  t0=$(date +%s%N)
  local restored=0
  for _ in $(seq 1 900); do
    if [ -e "$(c_path "$updated" /var/lib/cluster/boot-restored.json)" ] &&
      [ ! -e "$(c_path "$updated" /var/lib/cluster/boot.json)" ] &&
      [ "$(basename "$(readlink "$(c_path "$updated" /var/lib/cluster/current)")")" = "$hash2" ]; then
      restored=1
      break
    fi
    sleep 0.1
  done
  [ "$restored" = 1 ] || fail "$name: node $updated's boot guard did not restore ${hash2:0:12}"
  log "$name: node $updated back on ${hash2:0:12} after $((($(date +%s%N) - t0) / 1000000)) ms, no leader anywhere"
  for n in "$leader" "$bystander"; do
    state=$(in_c "$n" systemctl is-active cluster || true)
    [ "$state" != active ] || fail "$name: node $n should be down during the restore"
  done
  # Captured first: grep -q stopping early would fail the pipeline (pipefail, SIGPIPE).
  local journal
  journal=$(in_c "$updated" journalctl -u cluster --no-pager)
  grep -qF "release ${bad:0:12} did not stay up for 3 starts" <<<"$journal" ||
    fail "$name: node $updated's journal lacks the guard's restore"
  restarts_after=$(in_c "$updated" systemctl show -p NRestarts --value cluster)
  [ $((restarts_after - restarts_before)) -ge 4 ] ||
    fail "$name: node $updated restarted $((restarts_after - restarts_before)) times (3 tries and the restore need 4)"

  for n in "$leader" "$bystander"; do in_c "$n" systemctl start cluster; done
  local node_json=''
  for _ in $(seq 1 300); do
    node_json=$("$cli" status --json --node "127.0.0.1:${port[$updated]}" 2>/dev/null |
      jq -c --argjson id "$updated" --arg good "$hash2" --arg bad "$bad" \
        'select((.nodes | map(select(.role == "voter" and (.state == "leader" or .state == "follower"))) | length) == 3)
         | .nodes[] | select(.id == $id and .build_hash == $good and .last_auto_restore.to == $bad)' || true)
    [ -z "$node_json" ] || break
    sleep 0.2
  done
  [ -n "$node_json" ] || fail "$name: the cluster does not show node $updated's automatic restore: $(status_json)"
  local human
  human=$("$cli" status --node "127.0.0.1:${port[$updated]}")
  grep -F "node $updated restored itself from ${bad:0:12} to ${hash2:0:12}" <<<"$human" ||
    fail "$name: cluster status does not show the restore: $human"
  kill "$bg_update" 2>/dev/null || true
  bg_update=''
}

# The rollout a test left behind ends (the resumed one fails its health deadline and reverts).
wait_for_no_rollout() {
  for _ in $(seq 1 600); do
    [ "$(status_json 2>/dev/null | jq -r '.rollout.active == null' || true)" = true ] && return
    sleep 0.2
  done
  fail "a rollout is still active: $(status_json)"
}

# A release whose binary exits 1 at once.
mkdir -p "$work/dists/exits-at-once/bin"
# It answers --version as a cluster binary does (preflight starts it so on the leader),
# with the build hash of its own version.json, and cannot start otherwise.
cat >"$work/dists/exits-at-once/bin/cluster" <<SCRIPT
#!/bin/sh
if [ "\$1" = --version ]; then
  h=\$(sed -n 's/.*"buildHash": *"\([0-9a-f]*\)".*/\1/p' "\$(dirname "\$0")/../version.json")
  echo "cluster 0.1.0 (build \$h, protocol $("$cli" --version | sed -n 's/.*protocol \([0-9]*\))$/\1/p'))"
  exit 0
fi
echo "this release cannot start" >&2
exit 1
SCRIPT
chmod 0755 "$work/dists/exits-at-once/bin/cluster"
undone_with_no_leader exits-at-once
# A release that starts, serves, and is killed, again and again: killed once it answers
# `status --local` on this start (a bounded poll, not a fixed delay, so a slow container
# neither kills it before it serves nor lets it run on).
mkdir -p "$work/dists/crash-loops/bin"
cp "$cli" "$work/dists/crash-loops/bin/cluster.real"
cat >"$work/dists/crash-loops/bin/cluster" <<'SCRIPT'
#!/bin/sh
d=$(dirname "$0")
(
  polls=0
  while kill -0 $$ 2>/dev/null && [ $polls -lt 1800 ]; do
    if "$d/cluster.real" status --local --tls /etc/cluster/tls --node "$(cat /var/lib/cluster/node.addr)" >/dev/null 2>&1; then
      kill -9 $$
      exit 0
    fi
    sleep 0.1
    polls=$((polls + 1))
  done
) &
exec "$d/cluster.real" "$@"
SCRIPT
chmod 0755 "$work/dists/crash-loops/bin/cluster"
undone_with_no_leader crash-loops

# The operator's service under systemd: two releases of the sample service (this build's
# `cluster sample-service`) rolled out while wrk loads every node's ingress from the host.
# Each node restarts (a new MainPID) while its service keeps serving: the new node
# process adopts the running instance, then cuts over to the new release's.
service_dist() {
  local name=$1 version=$2 new_binary=${3:-}
  rm -rf "$work/dists/$name"
  cp -r "$work/dists/cluster-dist-2" "$work/dists/$name"
  rm -f "$work/dists/$name/version.json"
  # A release with a bin/cluster of its own, as a new build would ship.
  [ -z "$new_binary" ] || printf '\n# %s\n' "$name" >>"$work/dists/$name/bin/cluster"
  cat >"$work/dists/$name/service.toml" <<TOML
[[service]]
name = "web"
exec = "bin/cluster"
args = ["sample-service", "--version-text", "$version"]
listen = "127.0.0.1:0"
drain_timeout = "10s"
[service.check]
http = "/healthz"
interval = "200ms"
TOML
  "$cli" dist stamp "$work/dists/$name"
}
wait_for_no_rollout
svc1=$(service_dist svc-1 v1)
svc2=$(service_dist svc-2 v2 new-binary)
declare -A ingress=() instance_before=() main_before=()
# svc-1 ships the running bin/cluster: the nodes take it in place, none restarts.
for n in 1 2 3; do main_before[$n]=$(in_c "$n" systemctl show -p MainPID --value cluster); done
"$cli" update --dist "$work/dists/svc-1" --node "127.0.0.1:${port[1]}" --soak-ms 0 \
  >"$work/svc-1-update.log" 2>&1 || fail "rolling out svc-1: $(tail -20 "$work/svc-1-update.log")"
for n in 1 2 3; do
  [ "$(in_c "$n" systemctl show -p MainPID --value cluster)" = "${main_before[$n]}" ] ||
    fail "host $n restarted for a release that ships its running bin/cluster"
done
for n in 1 2 3; do
  for _ in $(seq 1 300); do
    instance_before[$n]=$(jq -r --arg h "$svc1" 'select(.release == $h) | .pid' \
      "$(c_path "$n" /var/lib/cluster/service-run/web.json)" 2>/dev/null || true)
    [ -z "${instance_before[$n]}" ] || break
    sleep 0.1
  done
  [ -n "${instance_before[$n]}" ] || fail "host $n runs no instance of ${svc1:0:12}: $(status_json)"
  ingress[$n]=$(cat "$(c_path "$n" /var/lib/cluster/service-run/web.addr)")
  [ "$(curl -fsS "http://${ingress[$n]}/version")" = v1 ] || fail "host $n: /version is not v1"
  main_before[$n]=$(in_c "$n" systemctl show -p MainPID --value cluster)
done
log "services: v1 on every node (${ingress[1]} ${ingress[2]} ${ingress[3]}), taken in place (MainPIDs unchanged); rolling out v2 with a new bin/cluster under wrk"
declare -A wrk_pid=()
for n in 1 2 3; do
  wrk -t1 -c4 -d600s --timeout 10s "http://${ingress[$n]}/version" >"$work/wrk-$n.out" 2>&1 &
  wrk_pid[$n]=$!
done
"$cli" update --dist "$work/dists/svc-2" --node "127.0.0.1:${port[1]}" --soak-ms 0 \
  >"$work/svc-2-update.log" 2>&1 || fail "rolling out svc-2: $(tail -20 "$work/svc-2-update.log")"
for n in 1 2 3; do
  for _ in $(seq 1 300); do
    [ "$(curl -fsS "http://${ingress[$n]}/version" 2>/dev/null)" = v2 ] && break
    sleep 0.1
  done
done
for n in 1 2 3; do kill -INT "${wrk_pid[$n]}"; wait "${wrk_pid[$n]}" || true; done
for n in 1 2 3; do
  out=$(cat "$work/wrk-$n.out")
  requests=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' <<<"$out")
  [ "${requests:-0}" -gt 0 ] || fail "host $n: wrk counted nothing: $out"
  if grep -qE 'Socket errors|Non-2xx' <<<"$out"; then fail "host $n: requests failed during the rollout: $out"; fi
  [ "$(curl -fsS "http://${ingress[$n]}/version")" = v2 ] || fail "host $n: /version is not v2"
  main_after=$(in_c "$n" systemctl show -p MainPID --value cluster)
  [ "$main_after" != "${main_before[$n]}" ] || fail "host $n: the node did not restart (MainPID $main_after)"
  journal=$(in_c "$n" journalctl -u cluster --no-pager _PID="$main_after")
  grep -qF "adopted the running instance service=web pid=${instance_before[$n]}" <<<"$journal" ||
    fail "host $n: the restarted node (pid $main_after) did not adopt the v1 instance ${instance_before[$n]}"
  grep -qF "switched: the old instance drains service=web" <<<"$journal" ||
    fail "host $n: no switch in the journal of pid $main_after"
  log "host $n: node restarted (MainPID ${main_before[$n]} -> $main_after), its v1 instance (pid ${instance_before[$n]}) served through it and was adopted; wrk: $requests requests, 0 failed, latency max $(awk '/Latency/ {print $4}' <<<"$out")"
done

# uninstall.sh keeps the node's data; --purge removes it.
in_c 3 /opt/cluster/scripts/uninstall.sh >"$work/uninstall.out" 2>&1 || fail "uninstall.sh: $(cat "$work/uninstall.out")"
[ ! -e "$(c_path 3 /etc/systemd/system/cluster.service)" ] && [ ! -e "$(c_path 3 /usr/local/bin/cluster)" ] &&
  [ -L "$(c_path 3 /var/lib/cluster/current)" ] && [ -f "$(c_path 3 /etc/cluster/tls/key.pem)" ] ||
  fail "uninstall.sh: $(cat "$work/uninstall.out")"
[ "$(in_c 3 systemctl is-active cluster || true)" != active ] || fail "uninstall.sh left the node running"
in_c 3 /opt/cluster/scripts/uninstall.sh --purge >"$work/uninstall.out" 2>&1 || fail "uninstall.sh --purge: $(cat "$work/uninstall.out")"
[ ! -e "$(c_path 3 /var/lib/cluster)" ] && [ ! -e "$(c_path 3 /etc/cluster)" ] &&
  grep -qF "remove the node's credentials /etc/cluster/tls" "$work/uninstall.out" ||
  fail "uninstall.sh --purge: $(cat "$work/uninstall.out")"
in_c 3 getent passwd cluster >/dev/null && fail "uninstall.sh --purge kept the user"
log "uninstall.sh kept the data and credentials; --purge removed them"
log "PASSED: README production install under systemd with mutual TLS, the boot guard with no leader, and a service rolled out under load with its node restarting"
