#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time: scripts/fuzz.sh [SECONDS_PER_TARGET] (default 60).
# Uses the nightly toolchain when rustup has one, otherwise RUSTC_BOOTSTRAP=1 on stable (both
# work on this project's machines); installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list | grep -q '^nightly'; then run=(cargo +nightly fuzz); else run=(env RUSTC_BOOTSTRAP=1 cargo fuzz); fi
for target in $("${run[@]}" list); do
  echo "== $target ($secs s)"
  # New inputs go to fuzz/corpus-new/<target> (not committed); the committed corpus is read.
  mkdir -p "corpus-new/$target"
  "${run[@]}" run "$target" "corpus-new/$target" "corpus/$target" -- -max_total_time="$secs" -print_final_stats=1 2>&1 | grep -E '^(stat::number_of_executed_units|Done|INFO: -max_total_time)|ERROR|panicked' || true
  if [ -d "artifacts/$target" ] && [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
    echo "crash found: fuzz/artifacts/$target" >&2; exit 1
  fi
done
