#!/usr/bin/env bash
# Makes a throwaway PKI for the TLS tests and benchmarks in DIR (EC P-256, openssl CLI):
#   ca.pem                 the CA both sides trust
#   other-ca.pem           a CA nobody is told to trust
#   dest.{pem,key}         destination: CN=destination, SAN DNS:localhost, DNS:dest.test, IP:127.0.0.1
#   source.{pem,key}       source: CN=source,O=multifd tests, SAN DNS:source.test
#   expired.{pem,key}      like source, but its validity ended a day ago
#   intruder.{pem,key}     CN=intruder, signed by the CA but on no allow-list
#   rogue.{pem,key}        CN=source, signed by other-ca
# Keys are generated fresh on every run and never committed.
set -Eeuo pipefail
trap 'echo "test-certs.sh: failed: $BASH_COMMAND (line $LINENO, exit $?)" >&2' ERR
dir=${1:?usage: test-certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
quiet() { "$@" >/dev/null 2>&1 || { echo "test-certs: $* failed" >&2; "$@"; exit 1; }; }

ca() { # name subject
  quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.pem" \
    -days 30 -subj "$2" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}

leaf() { # name subject san ca days
  quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$3" >"$1.ext"
  quiet openssl x509 -req -in "$1.csr" -CA "$4.pem" -CAkey "$4.key" -set_serial "0x$(openssl rand -hex 8)" -out "$1.pem" -days "$5" -extfile "$1.ext"
  rm -f "$1.csr" "$1.ext"
}

ca ca "/CN=multifd test CA"
ca other-ca "/CN=another CA"
leaf dest "/CN=destination" "DNS:localhost,DNS:dest.test,IP:127.0.0.1" ca 30
leaf source "/O=multifd tests/CN=source" "DNS:source.test" ca 30
leaf expired "/O=multifd tests/CN=source" "DNS:source.test" ca -1
leaf intruder "/CN=intruder" "DNS:intruder.test" ca 30
leaf rogue "/O=multifd tests/CN=source" "DNS:source.test" other-ca 30
rm -f ./*.srl
