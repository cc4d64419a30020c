#!/usr/bin/env bash
# Seal, open and data keys with curl over the Unix socket of a `serve --dev` sidecar.
# Usage: examples/curl.sh [SOCKET]   (default ./data/kms-sidecar.sock)
set -euo pipefail
sock=${1:-./data/kms-sidecar.sock}
api() { curl -sS --fail-with-body --unix-socket "$sock" -H 'content-type: application/json' "$@"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }

# Seal "hello" for tenant "demo", bound to the context "order-7" (AAD).
sealed=$(api -X POST http://localhost/v1/tenants/demo/seal \
  -d "{\"plaintext\":\"$(printf hello | base64)\",\"aad\":\"$(printf order-7 | base64)\"}")
ct=$(echo "$sealed" | field ciphertext)
echo "sealed: $sealed"

# Open it again with the same AAD.
opened=$(api -X POST http://localhost/v1/tenants/demo/open \
  -d "{\"ciphertext\":\"$ct\",\"aad\":\"$(printf order-7 | base64)\"}")
plain=$(echo "$opened" | field plaintext | base64 -d)
echo "opened: $plain"
[ "$plain" = hello ]

# Raw bytes: no base64, the AAD goes in a header.
printf 'raw payload' | curl -sS --fail-with-body --unix-socket "$sock" \
  -H 'content-type: application/octet-stream' -H "x-kms-aad: $(printf ctx | base64)" \
  --data-binary @- http://localhost/v1/tenants/demo/seal -o /tmp/kms-example-$$.bin
raw=$(curl -sS --fail-with-body --unix-socket "$sock" \
  -H 'content-type: application/octet-stream' -H "x-kms-aad: $(printf ctx | base64)" \
  --data-binary @/tmp/kms-example-$$.bin http://localhost/v1/tenants/demo/open)
rm -f /tmp/kms-example-$$.bin
echo "raw round trip: $raw"
[ "$raw" = "raw payload" ]

# A data key for local encryption, and its wrapped form to store beside the data.
dk=$(api -X POST http://localhost/v1/tenants/demo/datakey -d '{}')
wrapped=$(echo "$dk" | field wrapped_key)
again=$(api -X POST http://localhost/v1/tenants/demo/datakey:unwrap -d "{\"wrapped_key\":\"$wrapped\"}" | field plaintext_key)
[ "$again" = "$(echo "$dk" | field plaintext_key)" ]
echo "data key unwrapped to the same 32 bytes"

# A tampered ciphertext fails with one code, whatever was changed.
bad=$(curl -sS --unix-socket "$sock" -H 'content-type: application/json' -X POST \
  http://localhost/v1/tenants/demo/open -d "{\"ciphertext\":\"${ct%????}AAA=\"}")
echo "tampered: $bad"
echo "$bad" | grep -q '"code":"decrypt_failed"'
