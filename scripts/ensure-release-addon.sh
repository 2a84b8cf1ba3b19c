#!/usr/bin/env bash
# Builds the optimised addon unless the one in ts/native is already a release build of the
# current sources. `npm test` builds a debug addon and removes the marker.
set -euo pipefail
cd "$(dirname "$0")/.."
marker=target/.release-addon
node_file="$(ls ts/native/*.node 2>/dev/null | head -1)"
# Rebuild unless the marker is newer than the sources and than the .node (a debug build
# written after the marker makes the .node newer).
if [ ! -f "$marker" ] || [ -z "$node_file" ] || [ "$node_file" -nt "$marker" ] \
   || [ -n "$(find crates Cargo.toml Cargo.lock -newer "$marker" -type f | head -1)" ]; then
  npm run --silent build:native
  mkdir -p target && touch "$marker"
fi
