#!/usr/bin/env bash
# Every check of the project, from a fresh Debian machine with Rust stable:
# format, lints, all Rust tests (unit, property, integration against a real sidecar), the
# independent Python check of the published envelope vectors, the deploy/ manifests, and the
# examples against a live `serve --dev`. The PKCS#11 tests run against a real SoftHSM 2 token,
# the PostgreSQL tests against a real PostgreSQL server this script starts on 127.0.0.1 (its own
# cluster in a temp dir, stopped and removed at exit). Installs what it needs when missing
# (SoftHSM, OpenSC, PostgreSQL through apt-get). Prints a closing "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log=$(mktemp -d)
pgdir=""
pg_bin=""
work=""
cleanup() {
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
  cargo build --locked --quiet --bin kms-sidecar
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
cargo build --locked --bin kms-sidecar --example client
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
kill "$pid"; wait "$pid" || true

# Sum what every runner reported into one closing line.
read -r cargo_passed cargo_failed < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { print p + 0, f + 0 }' "$log/cargo-test.txt")
# Each vector is a test; the checker's self-test counts as one.
read -r py_passed py_failed < <(awk '/^vectors: [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 } /^self-test: [0-9]+ passed, [0-9]+ failed$/ { if ($4 == 0) p += 1; else f += 1 } END { print p + 0, f + 0 }' "$log/vectors.txt" "$log/selftest.txt")
passed=$((cargo_passed + py_passed + examples_ok + deploy_ok))
failed=$((cargo_failed + py_failed + examples_failed + deploy_failed))
echo
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
