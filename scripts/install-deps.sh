#!/usr/bin/env bash
# Installs system packages the suite needs (idempotent; as root on Debian). Node, npm and the
# Rust toolchain are expected to be present already (they cannot be fetched here).
set -euo pipefail
need=()
for cmd in node npm cargo; do
  command -v "$cmd" >/dev/null || { echo "install-deps: $cmd is required but missing" >&2; exit 1; }
done
command -v cc >/dev/null || need+=(build-essential)
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
