#!/usr/bin/env bash
# Builds the optimised addon unless the one in ts/native is already a release build of the
# current sources. `npm test` builds a debug addon, which makes the .node newer than the marker.
set -Eeuo pipefail
trap 'echo "ensure-release-addon.sh: failed: $BASH_COMMAND (line $LINENO, exit $?)" >&2' ERR
cd "$(dirname "$0")/.."
marker=target/.release-addon
shopt -s nullglob
addons=(ts/native/*.node)
shopt -u nullglob
stale() {
  [ ! -f "$marker" ] && return 0
  [ "${#addons[@]}" -eq 0 ] && return 0
  [ "${addons[0]}" -nt "$marker" ] && return 0
  [ -n "$(find crates Cargo.toml Cargo.lock -newer "$marker" -type f -print -quit)" ]
}
if stale; then
  command -v cargo >/dev/null || { echo "ensure-release-addon: cargo (Rust) is needed to build the native addon" >&2; exit 1; }
  echo "building the native addon (release, first run only: about 2 minutes on 2 cores)..." >&2
  npm run --silent build:native
  mkdir -p target && touch "$marker"
fi
