#!/usr/bin/env bash
# Installs system packages the suite needs (idempotent; as root on Debian). Node, npm and the
# Rust toolchain are expected to be present already (they cannot be fetched here).
set -Eeuo pipefail
trap 'echo "install-deps.sh: failed: $BASH_COMMAND (line $LINENO, exit $?)" >&2' ERR
need=()
for cmd in node npm cargo; do
  command -v "$cmd" >/dev/null || { echo "install-deps: $cmd is required but missing" >&2; exit 1; }
done
command -v cc >/dev/null || need+=(build-essential)
command -v setpriv >/dev/null && command -v prlimit >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
# The TLS tests, benchmarks and fuzz seeds make throwaway certificates with the openssl CLI.
command -v openssl >/dev/null || need+=(openssl)
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# QEMU 10: the suite checks our decoder against live QEMU multifd streams.
bash "$(dirname "$0")/install-qemu.sh"
