#!/usr/bin/env bash
# Builds the optimised addon unless the one in ts/native is already a release build of the
# current sources. `npm test` builds a debug addon and removes the marker.
set -euo pipefail
cd "$(dirname "$0")/.."
marker=target/.release-addon
if [ ! -f "$marker" ] || ! ls ts/native/*.node >/dev/null 2>&1 \
   || [ -n "$(find crates Cargo.toml Cargo.lock -newer "$marker" -type f | head -1)" ]; then
  npm run --silent build:native
  mkdir -p target && touch "$marker"
fi
