#!/usr/bin/env bash
# Builds a release dist of cluster: the release binary, the systemd unit, version.json.
#
#   scripts/build-dist.sh <out-dir>      # e.g. scripts/build-dist.sh /tmp/dist
#
# <out-dir> is replaced. The printed build hash identifies the release on every node;
# roll it out with `cluster update --dist <out-dir>`. Environment: CLUSTER_BUILD_PROFILE
# (cargo profile, default release), CLUSTER_DIST_EXTRA (a directory whose files are
# shipped in the dist too, e.g. share/...), CLUSTER_SIGNING_KEY (a release.key from
# `cluster dist keygen`: sign the dist with it, for nodes started with --release-key),
# CARGO_TARGET_DIR.
set -euo pipefail

if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,11p' "$0"
  [ $# -eq 1 ] && exit 0 || exit 2
fi
out=$1
root=$(cd "$(dirname "$0")/.." && pwd)

profile=${CLUSTER_BUILD_PROFILE:-release}
cargo build --profile "$profile" --locked --manifest-path "$root/Cargo.toml" --bin cluster
target=${CARGO_TARGET_DIR:-$root/target}
case "$profile" in dev) binary=$target/debug/cluster ;; *) binary=$target/$profile/cluster ;; esac
staging="$out.tmp.$$"
rm -rf "$staging"
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging/bin" "$staging/systemd"
install -m 0755 "$binary" "$staging/bin/cluster"
install -m 0644 "$root/systemd/cluster.service" "$staging/systemd/cluster.service"
if [ -n "${CLUSTER_DIST_EXTRA:-}" ]; then
  cp -R "$CLUSTER_DIST_EXTRA"/. "$staging"/
fi
# Stamp with the binary being packaged: the dist describes itself.
sign=()
[ -z "${CLUSTER_SIGNING_KEY:-}" ] || sign=(--sign "$CLUSTER_SIGNING_KEY")
# The commit it was built from: the staging directory is outside the checkout.
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
"$staging/bin/cluster" dist stamp "$staging" --git-commit "$commit" ${sign[@]+"${sign[@]}"} >/dev/null
rm -rf "$out"
mv "$staging" "$out"
trap - EXIT
"$out/bin/cluster" dist verify "$out"
