#!/usr/bin/env bash
# The long API fuzzing run: schemathesis with EXAMPLES (default 200) generated cases per operation
# against a fresh `serve --dev`. scripts/test.sh runs the same with 20.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
examples=${1:-200}
command -v schemathesis >/dev/null || python3 -m pip install --quiet schemathesis
cargo build --locked --bin kms-sidecar
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
(cd "$work" && KMS_SIDECAR_LISTEN__TCP=127.0.0.1:0 "$root/target/debug/kms-sidecar" serve --dev >"$work/serve.out" 2>"$work/serve.err") &
pid=$!
for _ in $(seq 1 200); do [ -S "$work/data/kms-sidecar.sock" ] && break; sleep 0.05; done
addr=$(sed -nE 's#^  tcp: +http://(127\.0\.0\.1:[0-9]+)$#\1#p' "$work/serve.out" | head -1)
schemathesis run "http://$addr/v1/openapi.json" \
  --checks not_a_server_error,response_schema_conformance,content_type_conformance \
  -H "Authorization: Bearer $(cat "$work/data/dev-token")" \
  --max-examples "$examples"
