#!/usr/bin/env bash
# Every check of the project, from a fresh Debian machine with Rust stable:
# format, lints, all Rust tests (unit, property, integration against a real sidecar), the
# independent Python check of the published envelope vectors, the deploy/ manifests, the examples
# and schemathesis against a live `serve --dev`, and a fuzz smoke run. The PKCS#11 tests run
# against a real SoftHSM 2 token, the AWS KMS tests against moto's KMS server, the PostgreSQL
# tests against a real PostgreSQL server this script starts on 127.0.0.1 (its own cluster in a
# temp dir, stopped and removed at exit). Installs what it needs when missing (SoftHSM, OpenSC,
# PostgreSQL through apt-get; moto and schemathesis from PyPI; cargo-fuzz). Prints a closing
# "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log=$(mktemp -d)
moto_pid=
pgdir=""
pg_bin=""
work=""
cleanup() {
  if [ -n "$moto_pid" ]; then
    kill "$moto_pid" 2>/dev/null || true
    wait "$moto_pid" 2>/dev/null || true
  fi
  if [ -n "$pgdir" ] && [ -d "$pgdir/data" ]; then
    as_postgres "$pg_bin/pg_ctl" -D "$pgdir/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$log" ${pgdir:+"$pgdir"} ${work:+"$work"}
}
trap cleanup EXIT
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

step() { printf '\n== %s\n' "$*"; }

step "prerequisites"
if ! python3 -c 'import cryptography' 2>/dev/null; then
  echo "installing the Python cryptography package (vector checker)"
  python3 -m pip install --quiet 'cryptography>=42'
fi
for tool in curl python3 openssl; do
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
# PostgreSQL server binaries (initdb, pg_ctl, postgres) for the fleet tests. Missing and not
# installable is a failure, never a skip.
find_pg() { for d in /usr/lib/postgresql/*/bin; do [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ] && pg_bin=$d; done; true; }
find_pg
if [ -z "$pg_bin" ] && { [ "${CI:-}" = true ] || [ "$(id -u)" = 0 ]; }; then
  echo "installing postgresql (fleet store tests)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  find_pg
fi
if [ -z "$pg_bin" ]; then
  echo "PostgreSQL server missing: apt-get install -y postgresql (the fleet tests need it)" >&2
  exit 1
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "installing PyYAML (deploy manifest check)"
  python3 -m pip install --quiet 'pyyaml>=6'
fi
{ cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1 || rustup component add rustfmt clippy

step "PostgreSQL test server (own cluster on 127.0.0.1)"
pgdir=$(mktemp -d)
if [ "$(id -u)" = 0 ]; then chown postgres: "$pgdir"; fi
as_postgres "$pg_bin/initdb" -D "$pgdir/data" -U postgres -A trust --no-sync -E UTF8 >"$log/initdb.txt"
pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_postgres "$pg_bin/pg_ctl" -D "$pgdir/data" -l "$pgdir/server.log" -w \
  -o "-p $pg_port -k $pgdir -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=off" start >/dev/null
export KMS_TEST_PG="postgres://postgres@127.0.0.1:$pg_port/postgres"
export KMS_TEST_PG_BIN="$pg_bin"
echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $NF}') on 127.0.0.1:$pg_port"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings

# moto's KMS server for tests/aws_kms.rs, in a venv under target/ (moto 5.2.5), on a free loopback
# port; stopped by the EXIT trap. Under CI=true a failure here fails the run (and the tests fail
# without TEST_MOTO_KMS_URL); elsewhere the AWS tests are skipped with a message.
step "moto KMS server"
moto_version=5.2.5
venv="$root/target/peers/venv"
start_moto() {
  if [ "$("$venv/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" != "$moto_version" ]; then
    echo "installing moto[server]==$moto_version into $venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
      if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      fi
      python3 -m venv "$venv" || return 1
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$moto_version" || return 1
  fi
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log/moto.log" 2>&1 &
  moto_pid=$!
  for _ in $(seq 1 240); do
    if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/moto-api/" 2>/dev/null; then
      export TEST_MOTO_KMS_URL="http://127.0.0.1:$port"
      echo "moto $moto_version on $TEST_MOTO_KMS_URL (pid $moto_pid)"
      return 0
    fi
    kill -0 "$moto_pid" 2>/dev/null || break
    sleep 0.25
  done
  tail -n 20 "$log/moto.log" >&2 || true
  return 1
}
if ! start_moto; then
  if [ "${CI:-}" = true ]; then
    echo "moto could not be started; the AWS KMS tests cannot run" >&2
    exit 1
  fi
  echo "WARNING: moto could not be started; tests/aws_kms.rs will skip" >&2
fi

step "cargo test (unit, property, integration, benches in test mode)"
cargo test --locked --all-targets 2>&1 | tee "$log/cargo-test.txt"

step "independent Python check of tests/vectors (docs/envelope.md only)"
python3 scripts/check_vectors.py | tee "$log/vectors.txt"
python3 scripts/check_vectors.py --self-test | tee "$log/selftest.txt"

step "deploy/: systemd unit, Kubernetes manifests, Dockerfile"
deploy_ok=0; deploy_failed=0
if python3 scripts/check_deploy.py >"$log/deploy.txt" 2>&1; then
  cat "$log/deploy.txt"; deploy_ok=$((deploy_ok + 1))
else
  echo "FAIL scripts/check_deploy.py"; cat "$log/deploy.txt"; deploy_failed=$((deploy_failed + 1))
fi
if command -v systemd-analyze >/dev/null; then
  # verify checks that ExecStart exists: point a copy of the unit at the binary just built.
  unit_dir=$(mktemp -d)
  sed "s#/usr/local/bin/kms-sidecar#$root/target/debug/kms-sidecar#" deploy/kms-sidecar.service >"$unit_dir/kms-sidecar.service"
  # The binary `cargo test --all-targets` built; a separate `cargo build` would resolve features
  # without the dev-dependencies and rebuild much of the tree.
  [ -x target/debug/kms-sidecar ] || cargo build --locked --quiet --bin kms-sidecar
  if systemd-analyze verify "$unit_dir/kms-sidecar.service" >"$log/unit.txt" 2>&1 && ! grep -q . "$log/unit.txt"; then
    echo "ok   systemd-analyze verify deploy/kms-sidecar.service"; deploy_ok=$((deploy_ok + 1))
  else
    echo "FAIL systemd-analyze verify deploy/kms-sidecar.service"; cat "$log/unit.txt"; deploy_failed=$((deploy_failed + 1))
  fi
  rm -rf "$unit_dir"
else
  echo "FAIL systemd-analyze not found (apt-get install systemd)"; deploy_failed=$((deploy_failed + 1))
fi

step "examples against a live serve --dev"
[ -x target/debug/kms-sidecar ] || cargo build --locked --bin kms-sidecar
work=$(mktemp -d)
(cd "$work" && KMS_SIDECAR_LISTEN__TCP=127.0.0.1:0 exec "$root/target/debug/kms-sidecar" serve --dev >"$log/serve.out" 2>"$log/serve.err") &
pid=$!
for _ in $(seq 1 200); do [ -S "$work/data/kms-sidecar.sock" ] && break; sleep 0.05; done
examples_ok=0; examples_failed=0
for ex in "bash examples/curl.sh" "python3 examples/client.py" "cargo run --locked --quiet --example client --"; do
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
  echo "ok   schemathesis ($(grep -E '[0-9]+ generated' "$log/schemathesis.txt" | tr -s ' '))"; examples_ok=$((examples_ok + 1))
else
  echo "FAIL schemathesis"; tail -60 "$log/schemathesis.txt"; examples_failed=$((examples_failed + 1))
fi
kill "$pid"; wait "$pid" || true

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
passed=$((cargo_passed + py_passed + examples_ok + deploy_ok + fuzz_ok))
failed=$((cargo_failed + py_failed + examples_failed + deploy_failed + fuzz_failed))
echo
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
