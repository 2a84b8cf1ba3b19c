#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer on stable Rust (no nightly: the sancov pass is enabled
# with stable -C flags, and --target keeps the instrumentation off build scripts).
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# Targets (fuzz/fuzz_targets): channel_stream (the capture/stream decoder: init packet,
# headers, validation, zlib/zstd payloads) and snapshot_file (our snapshot reader and QEMU's
# mapped-ram file reader), certificate_identity (the TLS allow-list's certificate reader,
# seeded with throwaway certificates from scripts/test-certs.sh). The corpus in fuzz/corpus
# is kept and grows with each run.
# Crashes are written to fuzz/artifacts/ and make this script fail.
set -Eeuo pipefail
trap 'echo "fuzz.sh: failed: $BASH_COMMAND (line $LINENO, exit $?)" >&2' ERR
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
  cargo build --quiet --release --target "$target" --target-dir ../target/fuzz
mkdir -p artifacts
status=0
seeds="$(mktemp -d)"
trap 'rm -rf "$seeds"' EXIT
bash ../scripts/test-certs.sh "$seeds/pki"
mkdir -p "$seeds/certificate_identity" "$seeds/channel_stream" "$seeds/snapshot_file"
for pem in "$seeds"/pki/*.pem; do
  openssl x509 -in "$pem" -outform der -out "$seeds/certificate_identity/$(basename "$pem" .pem).der"
done
for t in channel_stream snapshot_file certificate_identity; do
  mkdir -p "corpus/$t"
  log="$(mktemp)"
  if "../target/fuzz/$target/release/$t" "corpus/$t" "$seeds/$t" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 \
       -artifact_prefix="artifacts/$t-" -print_final_stats=1 > "$log" 2>&1; then
    result="no crash"
  else
    result="FAILED: see fuzz/artifacts/ and the log below"
    status=1
    tail -40 "$log"
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  echo "fuzz $t: ${runs:-?} executions in ${seconds}s, corpus $(ls "corpus/$t" | wc -l) inputs: $result"
  rm -f "$log"
done
rm -f "${TMPDIR:-/tmp}"/multifd-fuzz-*
exit "$status"
