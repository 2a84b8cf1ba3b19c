#!/usr/bin/env bash
# Builds what the npm package ships: the optimised addon for this platform and the compiled
# facade in dist/, with the generated loader and the .node binary beside it (no Rust toolchain
# or install script is needed where the package is installed).
set -Eeuo pipefail
trap 'echo "build-package.sh: failed: $BASH_COMMAND (line $LINENO, exit $?)" >&2' ERR
cd "$(dirname "$0")/.."
bash scripts/ensure-release-addon.sh
rm -rf dist
npx tsc -p tsconfig.build.json
mkdir -p dist/native
cp ts/native/binding.cjs ts/native/binding.d.cts ts/native/*.node dist/native/
chmod +x dist/cli/main.js
echo "built dist/ ($(du -sh dist | cut -f1))"
