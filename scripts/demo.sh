#!/usr/bin/env bash
# `npm run demo`: the main job on loopback (`multifd demo`). The demo shows speed, so it runs
# on the optimised addon, built on first use.
set -Eeuo pipefail
trap 'echo "demo.sh: failed: $BASH_COMMAND (line $LINENO, exit $?)" >&2' ERR
cd "$(dirname "$0")/.."
bash scripts/ensure-release-addon.sh
exec node --import=tsx ts/cli/main.ts demo "$@"
