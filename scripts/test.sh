#!/usr/bin/env bash
# Every check of the project, from a fresh Debian machine with Rust stable:
# format, lints, all Rust tests (unit, property, integration against a real sidecar), the
# independent Python check of the published envelope vectors, and the examples against a live
# `serve --dev`. The PKCS#11 tests run against a real SoftHSM 2 token. Installs what it needs when
# missing (SoftHSM and OpenSC through apt-get). Prints a closing "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

step() { printf '\n== %s\n' "$*"; }

step "prerequisites"
if ! python3 -c 'import cryptography' 2>/dev/null; then
  echo "installing the Python cryptography package (vector checker)"
  python3 -m pip install --quiet 'cryptography>=42'
fi
for tool in curl python3; do
  if ! command -v "$tool" >/dev/null; then
    if [ "${CI:-}" = true ] || [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null
    else
      echo "missing $tool" >&2; exit 1
    fi
  fi
done
# SoftHSM 2 is the real token of the PKCS#11 tests; OpenSC's pkcs11-tool checks keys independently.
# Missing and not installable is a failure, never a skip.
softhsm_ok() { [ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null && command -v pkcs11-tool >/dev/null; }
if ! softhsm_ok && { [ "${CI:-}" = true ] || [ "$(id -u)" = 0 ]; }; then
  echo "installing softhsm2 and opensc (PKCS#11 tests)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 opensc >/dev/null
fi
if ! softhsm_ok; then
  echo "SoftHSM 2 / OpenSC missing: apt-get install -y softhsm2 opensc (the PKCS#11 tests need them)" >&2
  exit 1
fi
{ cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1 || rustup component add rustfmt clippy

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "cargo test (unit, property, integration, benches in test mode)"
cargo test --locked --all-targets 2>&1 | tee "$log/cargo-test.txt"

step "independent Python check of tests/vectors (docs/envelope.md only)"
python3 scripts/check_vectors.py | tee "$log/vectors.txt"
python3 scripts/check_vectors.py --self-test | tee "$log/selftest.txt"

step "examples against a live serve --dev"
cargo build --locked --bin kms-sidecar
work=$(mktemp -d)
(cd "$work" && KMS_SIDECAR_LISTEN__TCP=127.0.0.1:0 "$root/target/debug/kms-sidecar" serve --dev >"$log/serve.out" 2>"$log/serve.err") &
pid=$!
for _ in $(seq 1 200); do [ -S "$work/data/kms-sidecar.sock" ] && break; sleep 0.05; done
examples_ok=0; examples_failed=0
for ex in "bash examples/curl.sh" "python3 examples/client.py"; do
  if $ex "$work/data/kms-sidecar.sock" >"$log/example.txt" 2>&1; then
    echo "ok   $ex"; examples_ok=$((examples_ok + 1))
  else
    echo "FAIL $ex"; cat "$log/example.txt"; examples_failed=$((examples_failed + 1))
  fi
done

step "schemathesis: the OpenAPI document against the live sidecar"
# Every operation with generated inputs: no server error, every answer matches the document.
# SCHEMATHESIS_EXAMPLES raises the count (scripts/schemathesis.sh runs 200 per operation).
if ! command -v schemathesis >/dev/null; then
  echo "installing schemathesis"
  python3 -m pip install --quiet schemathesis
fi
addr=$(sed -nE 's#^  tcp: +http://(127\.0\.0\.1:[0-9]+)$#\1#p' "$log/serve.out" | head -1)
if schemathesis run "http://$addr/v1/openapi.json" \
    --checks not_a_server_error,response_schema_conformance,content_type_conformance \
    -H "Authorization: Bearer $(cat "$work/data/dev-token")" \
    --max-examples "${SCHEMATHESIS_EXAMPLES:-20}" >"$log/schemathesis.txt" 2>&1; then
  echo "ok   schemathesis ($(grep -E 'generated' "$log/schemathesis.txt" | tr -s ' '))"; examples_ok=$((examples_ok + 1))
else
  echo "FAIL schemathesis"; tail -60 "$log/schemathesis.txt"; examples_failed=$((examples_failed + 1))
fi
kill "$pid"; wait "$pid" || true
rm -rf "$work"

step "fuzz smoke: every cargo-fuzz target for a few seconds (scripts/fuzz.sh runs them long)"
command -v cargo-fuzz >/dev/null || cargo install --quiet cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then fuzz=(cargo +nightly fuzz); else fuzz=(env RUSTC_BOOTSTRAP=1 cargo fuzz); fi
fuzz_ok=0; fuzz_failed=0
for target in $(cd fuzz && "${fuzz[@]}" list); do
  scratch=$(mktemp -d)
  # New inputs go to a scratch dir; the committed corpus is only read.
  if (cd fuzz && "${fuzz[@]}" run "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="${FUZZ_SECONDS:-5}" -print_final_stats=1) >"$log/fuzz-$target.txt" 2>&1; then
    runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+)/\1/p' "$log/fuzz-$target.txt" | tail -1)
    echo "ok   fuzz $target (${runs:-?} runs)"; fuzz_ok=$((fuzz_ok + 1))
  else
    echo "FAIL fuzz $target"; tail -40 "$log/fuzz-$target.txt"; fuzz_failed=$((fuzz_failed + 1))
  fi
  rm -rf "$scratch"
done

# Sum what every runner reported into one closing line.
read -r cargo_passed cargo_failed < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { print p + 0, f + 0 }' "$log/cargo-test.txt")
# Each vector is a test; the checker's self-test counts as one.
read -r py_passed py_failed < <(awk '/^vectors: [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 } /^self-test: [0-9]+ passed, [0-9]+ failed$/ { if ($4 == 0) p += 1; else f += 1 } END { print p + 0, f + 0 }' "$log/vectors.txt" "$log/selftest.txt")
passed=$((cargo_passed + py_passed + examples_ok + fuzz_ok))
failed=$((cargo_failed + py_failed + examples_failed + fuzz_failed))
echo
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
