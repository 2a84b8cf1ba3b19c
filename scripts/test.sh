#!/usr/bin/env bash
# The whole suite, as `npm test` runs it: build the addon (debug), type-check, lint Rust,
# run the Rust tests, then the ava suite. The last line is `ava: N passed, N failed`.
set -Eeuo pipefail
trap 'echo "test.sh: failed: $BASH_COMMAND (line $LINENO, exit $?)" >&2' ERR
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }

step "build native addon (debug)"
npm run --silent build:native:debug
step "type-check (tsc --noEmit)"
npx tsc --noEmit -p tsconfig.json
step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
step "cargo test"
cargo test --workspace --quiet
step "ava"
exec bash scripts/ava-summary.sh
