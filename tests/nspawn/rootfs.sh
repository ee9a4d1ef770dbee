#!/usr/bin/env bash
# Builds (once) the Debian bookworm root the nspawn test boots, cached outside the repo.
# Built into a temp dir and renamed, so a half-built cache is never used.
# Usage: tests/nspawn/rootfs.sh [cache dir]   (prints the root's path)
set -euo pipefail
cache=${1:-${CLUSTER_TEST_CACHE:-/var/cache/cluster-test}}
root="$cache/bookworm-root"
if [[ -x "$root/lib/systemd/systemd" ]]; then
    echo "$root"
    exit 0
fi
mkdir -p "$cache"
# What an interrupted build left behind is never used; it goes now.
rm -rf "$cache"/bookworm-root.partial.*
tmp=$(mktemp -d "$cache/bookworm-root.partial.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "building $root with debootstrap (about a minute, once)" >&2
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$tmp" \
    http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 || {
    echo "debootstrap failed: see $cache/debootstrap.log" >&2
    tail -20 "$cache/debootstrap.log" >&2
    exit 1
}
rm -rf "$root"
mv "$tmp" "$root"
trap - EXIT
echo "$root"
