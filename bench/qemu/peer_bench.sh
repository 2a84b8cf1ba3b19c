#!/usr/bin/env bash
# QEMU -> `multifd recv --qemu` beside QEMU -> QEMU over TCP and QEMU's local `migrate file:`
# save (mapped-ram), same guest size and channels, one run each, one JSON line per run.
# Usage: bench/qemu/peer_bench.sh [SIZE_MIB=256] [CHANNELS=4] [OUTDIR=/var/tmp]
# Build the release addon first (npm run build:native). OUTDIR holds the files written.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
size="${1:-256}" channels="${2:-4}" outdir="${3:-/var/tmp}"
work="$(mktemp -d /dev/shm/multifd-qemu-peerbench-XXXXXX)"
out="$(mktemp -d "$outdir/multifd-peerbench-XXXXXX")"
trap 'rm -rf "$work" "$out"' EXIT
ram="$work/src.ram"
python3 "$here/ramgen.py" "$size" "$ram" >/dev/null

# 1. QEMU -> recv --qemu -> a mapped-ram file in OUTDIR.
"$here/../../scripts/multifd" recv --qemu tcp:127.0.0.1:0 --to "$out/recv.qemu" --json >"$work/recv.json" 2>"$work/recv.err" &
recv=$!
for _ in $(seq 100); do grep -q 'listening on' "$work/recv.err" 2>/dev/null && break; sleep 0.1; done
addr="$(sed -n 's/^listening on \(tcp:[^ ]*\).*/\1/p' "$work/recv.err")"
src="$(python3 "$here/qemu_peer.py" source --ram "$ram" --uri "$addr" --channels "$channels")"
wait "$recv"
python3 - "$src" "$work/recv.json" "$size" "$channels" <<'PY'
import json, sys
src, recv = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
size = int(sys.argv[3]) << 20
print(json.dumps({"run": "qemu->recv --qemu (file)", "channels": int(sys.argv[4]), "sizeBytes": size,
                  "sourceSeconds": src.get("seconds"), "receiverSeconds": round(recv["seconds"], 4),
                  "MiBps": round(size / recv["seconds"] / 2**20, 1), "status": recv["status"]}))
PY
# 2. QEMU -> QEMU over TCP (destination RAM in /dev/shm).
python3 "$here/qemu_mig.py" --mode tcp --size-mib "$size" --channels "$channels" --prealloc none --src-ram "$ram" 2>/dev/null \
  | python3 -c 'import json,sys; r=json.loads(sys.stdin.readline()); print(json.dumps({"run": "qemu->qemu tcp", "channels": r["channels"], "sizeBytes": r["sizeBytes"], "seconds": r["seconds"], "MiBps": round(r["bytesPerSecond"]/2**20, 1) if r["bytesPerSecond"] else None, "status": r["status"]}))'
# 3. QEMU's local save: migrate file: with mapped-ram (+ multifd) into OUTDIR.
python3 "$here/qemu_mig.py" --mode save --mapped-ram --file "$out/save.qemu" --size-mib "$size" --channels "$channels" --prealloc none --src-ram "$ram" 2>/dev/null \
  | python3 -c 'import json,sys; r=json.loads(sys.stdin.readline()); print(json.dumps({"run": "qemu migrate file: (mapped-ram)", "channels": r["channels"], "sizeBytes": r["sizeBytes"], "seconds": r["seconds"], "MiBps": round(r["bytesPerSecond"]/2**20, 1) if r["bytesPerSecond"] else None, "status": r["status"]}))'
