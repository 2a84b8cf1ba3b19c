#!/usr/bin/env bash
# `npm run demo`: the main job on loopback. Builds the addon if it is missing, then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo measures speed: build the optimised addon unless one is already there.
if [ ! -f target/.release-addon ] || ! ls ts/native/*.node >/dev/null 2>&1; then npm run --silent build:native && mkdir -p target && touch target/.release-addon; fi
exec node --import=tsx ts/demo.ts "$@"
