#!/usr/bin/env bash
# Proves the package installs and works: packs it, installs the tarball into a fresh Node
# project, imports it (ESM and CommonJS), runs `npx multifd --help` and a small migration.
set -Eeuo pipefail
trap 'echo "check-package.sh: failed: $BASH_COMMAND (line $LINENO, exit $?)" >&2' ERR
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/build-package.sh"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$root" && npm pack --silent --pack-destination "$work" >/dev/null)
tarball="$(ls "$work"/multifd-*.tgz)"
echo "packed $(basename "$tarball") ($(du -h "$tarball" | cut -f1))"
mkdir "$work/app" && cd "$work/app"
npm init -y >/dev/null
npm pkg set type=module
npm install --silent --no-audit --no-fund "$tarball"
node --input-type=module -e "
  const m = await import('multifd')
  for (const f of ['migrate', 'snapshot', 'restore', 'decodePacketHeader', 'rebuildFromCaptures']) if (typeof m[f] !== 'function') throw new Error('missing export ' + f)
  if (typeof m.RamBlock?.allocate !== 'function') throw new Error('missing RamBlock')
  console.log('ESM import: ok')
"
node -e "const m = require('multifd'); if (typeof m.migrate !== 'function') throw new Error('no CommonJS'); console.log('CommonJS require: ok')"
npx multifd --help | head -1
npx multifd bench --size 16M --channels 2 --json | node -e "
  const r = JSON.parse(require('fs').readFileSync(0, 'utf8').trim().split('\n').pop())
  if (r.status !== 'completed' || !(r.bytesPerSecond > 0)) throw new Error('bench failed: ' + JSON.stringify(r))
  console.log('npx multifd bench: ok, ' + (r.bytesPerSecond / 1e9).toFixed(2) + ' GB/s')
"
echo "package: installs and works"
