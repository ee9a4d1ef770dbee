# etcd as the reference for leader-change gaps and write latency (sourced by bench.sh).
#
# Debian's etcd-server and etcd-client are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into a cache dir, so no system service is installed or started. Three
# members run on loopback with the same election timeout as `cluster` nodes (300 ms). etcd
# refuses a heartbeat above a fifth of the election timeout, so its heartbeat is 60 ms
# (cluster: 100 ms); a shorter heartbeat only helps etcd detect a dead leader.

etcd_cache=${CLUSTER_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cluster-bench}/etcd

# etcd_install: sets etcd_bin and etcdctl_bin, downloading the packages once.
etcd_install() {
  etcd_bin="$etcd_cache/root/usr/bin/etcd"
  etcdctl_bin="$etcd_cache/root/usr/bin/etcdctl"
  [ -x "$etcd_bin" ] && [ -x "$etcdctl_bin" ] && return 0
  mkdir -p "$etcd_cache"
  if ! apt-cache show etcd-server etcd-client >/dev/null 2>&1; then
    say "apt-get update (apt-cache does not know etcd-server yet)"
    apt-get update -qq
  fi
  say "downloading etcd-server and etcd-client (apt-get download) into $etcd_cache"
  (cd "$etcd_cache" && rm -f ./*.deb && apt-get download -q etcd-server etcd-client >/dev/null 2>&1)
  local deb
  for deb in "$etcd_cache"/*.deb; do dpkg-deb -x "$deb" "$etcd_cache/root"; done
  [ -x "$etcd_bin" ] || { echo "no etcd binary in the unpacked packages" >&2; exit 1; }
}

# etcd_start_member DIR I: starts member I (1..3) from the ports chosen by etcd_up.
etcd_start_member() {
  local dir=$1 i=$2 state=${3:-new}
  spawn "$dir/m$i.log" "$etcd_bin" --name "m$i" --data-dir "$dir/m$i" \
    --listen-client-urls "http://127.0.0.1:${etcd_client_ports[$i]}" \
    --advertise-client-urls "http://127.0.0.1:${etcd_client_ports[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${etcd_peer_ports[$i]}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${etcd_peer_ports[$i]}" \
    --initial-cluster "$etcd_initial" --initial-cluster-state "$state" \
    --initial-cluster-token cluster-bench \
    --heartbeat-interval 60 --election-timeout 300 --logger zap --log-level warn
  etcd_pids[$i]=$spawned_pid
}

# etcd_up DIR: three members; sets etcd_endpoints (host:port,...) and etcd_pids[1..3].
etcd_up() {
  local dir=$1 i attempt
  mkdir -p "$dir"
  for attempt in 1 2 3; do
    declare -gA etcd_client_ports=() etcd_peer_ports=() etcd_pids=()
    etcd_initial=
    for i in 1 2 3; do
      etcd_client_ports[$i]=$(free_port)
      etcd_peer_ports[$i]=$(free_port)
      etcd_initial+="${etcd_initial:+,}m$i=http://127.0.0.1:${etcd_peer_ports[$i]}"
    done
    etcd_endpoints=$(for i in 1 2 3; do echo "127.0.0.1:${etcd_client_ports[$i]}"; done | paste -sd,)
    rm -rf "$dir"/m*
    for i in 1 2 3; do etcd_start_member "$dir" "$i"; done
    local deadline=$(( $(date +%s) + 30 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
      for i in 1 2 3; do kill -0 "${etcd_pids[$i]}" 2>/dev/null || break 2; done
      if "$etcdctl_bin" --endpoints "$etcd_endpoints" endpoint health >/dev/null 2>&1 &&
        [ -n "$(etcd_leader)" ]; then
        return 0
      fi
      sleep 0.2
    done
    say "etcd did not form (a port may have been taken); retrying"
    for i in 1 2 3; do stop_group "${etcd_pids[$i]}"; done
  done
  echo "etcd did not start; logs in $dir" >&2
  tail -n 5 "$dir"/m*.log >&2
  exit 1
}

# etcd_status: `endpoint status` of every member, one "endpoint, id, version, size, is
# leader, ..." line each (the simple format keeps the 64-bit ids exact).
etcd_status() { "$etcdctl_bin" --endpoints "$etcd_endpoints" endpoint status -w simple 2>/dev/null || true; }

# etcd_leader: the index (1..3) of the member that leads, by its client port.
etcd_leader() {
  local endpoint i
  endpoint=$(etcd_status | awk -F', ' '$5 == "true" { print $1; exit }')
  for i in 1 2 3; do
    [ "$endpoint" = "127.0.0.1:${etcd_client_ports[$i]}" ] && echo "$i" && return 0
  done
  return 0
}

# etcd_member_id I: member I's id in hex, as move-leader wants it.
etcd_member_id() {
  etcd_status | awk -F', ' -v e="127.0.0.1:${etcd_client_ports[$1]}" '$1 == e { print $2 }'
}
