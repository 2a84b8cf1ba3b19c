#!/usr/bin/env bash
# `npm run demo`: the main job on loopback. Builds the addon if it is missing, then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls ts/native/*.node >/dev/null 2>&1; then npm run --silent build:native; fi
exec node --import=tsx ts/demo.ts "$@"
