#!/usr/bin/env bash
# Runs ava with TAP output and prints the closing line CI reads: `ava: N passed, N failed`.
set -uo pipefail
cd "$(dirname "$0")/.."
tap="$(mktemp)"
trap 'rm -f "$tap"' EXIT
# Bounded: a test that leaves a handle open keeps its worker, and so ava, alive forever.
timeout --kill-after=30 "${AVA_TIMEOUT:-1500}" npx ava --tap "$@" 2>&1 | tee "$tap"
rc=${PIPESTATUS[0]}
awk '
  /^ok [0-9]+ /      { if ($0 ~ /# SKIP/) s++; else p++ }
  /^not ok [0-9]+ /  { if ($0 ~ /# TODO/) t++; else f++ }
  END { printf "ava: %d passed, %d failed, %d skipped\n", p, f, s }' "$tap"
exit "$rc"
