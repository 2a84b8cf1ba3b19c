#!/usr/bin/env bash
# Installs QEMU 10.x (package qemu-system-x86) from Debian bookworm-backports so that
# bench/qemu/ can migrate QEMU -> QEMU on this machine. Run as root on Debian bookworm.
# Idempotent: exits early when a QEMU 10 or newer is already on PATH, and adds the backports
# suite only once. The suite is added on the same Debian archive the apt sources already use,
# so no mirror is named here.
set -Eeuo pipefail
trap 'echo "install-qemu.sh: failed: $BASH_COMMAND (line $LINENO, exit $?)" >&2' ERR

have_qemu10() {
  local v
  v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9]*\)\..*/\1/p' | head -n1)
  [ -n "$v" ] && [ "$v" -ge 10 ]
}

if have_qemu10; then
  qemu-system-x86_64 --version | head -n1
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "install-qemu: run as root" >&2; exit 1; }
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ "$codename" = bookworm ] || { echo "install-qemu: expected Debian bookworm, found '${codename}'" >&2; exit 1; }

if ! grep -rqs -- 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # Pick the Debian archive the machine already uses: the first URI (deb822 *.sources or
  # one-line sources.list) that serves the bookworm suite and is not the security archive.
  archive=$(
    {
      for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822 stanzas are separated by blank lines; keep URIs of stanzas listing bookworm.
        awk 'BEGIN{RS=""} /(^|\n)Suites:[^\n]*bookworm([ \n]|$)/ {
               if (match($0, /(^|\n)URIs:[^\n]*/)) { s = substr($0, RSTART, RLENGTH); sub(/^\n?URIs:[ \t]*/, "", s); print s }
             }' "$f"
      done
      if [ -f /etc/apt/sources.list ]; then
        sed -n 's/^[[:space:]]*deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]\{1,\}\)[[:space:]]\{1,\}bookworm[[:space:]].*/\2/p' /etc/apt/sources.list
      fi
    } | tr ' \t' '\n\n' | grep -v -e 'security' -e '^$' | head -n1
  )
  [ -n "$archive" ] || { echo "install-qemu: no Debian bookworm archive found in the apt sources" >&2; exit 1; }
  echo "install-qemu: adding bookworm-backports on $archive"
  cat > /etc/apt/sources.list.d/bookworm-backports.sources <<EOF
Types: deb
URIs: $archive
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null

if ! have_qemu10; then
  echo "install-qemu: installed, but qemu-system-x86_64 is not 10.x:" >&2
  qemu-system-x86_64 --version >&2 || true
  exit 1
fi
qemu-system-x86_64 --version | head -n1
