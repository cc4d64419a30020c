#!/usr/bin/env bash
# Creates a SoftHSM 2 token for development and CI, in a directory of its own:
#   hsm/softhsm-token.sh DIR [LABEL]
# writes DIR/softhsm2.conf (tokens in DIR/tokens), initialises a token labelled LABEL (default
# kms-sidecar-dev) with the well-known dev PINs below, writes the user PIN to DIR/LABEL.pin
# (mode 0600, for `pin_file`), and prints the one line to run:  export SOFTHSM2_CONF=...
# so that   eval "$(hsm/softhsm-token.sh /tmp/hsm)"   sets it. Everything else goes to stderr.
# Running it again with another LABEL adds a token to the same DIR; with the same LABEL it
# leaves the existing token alone. These PINs are public: never use such a token for real keys.
set -euo pipefail

usage() { echo "usage: $0 DIR [LABEL]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
dir=$1
label=${2:-kms-sidecar-dev}
so_pin=${SOFTHSM_SO_PIN:-kms-dev-so-pin}
user_pin=${SOFTHSM_USER_PIN:-kms-dev-user-pin}

if ! command -v softhsm2-util >/dev/null; then
  echo "softhsm2-util not found: apt-get install -y softhsm2" >&2
  exit 1
fi
if [ ${#label} -gt 32 ]; then
  echo "token label longer than 32 bytes: $label" >&2
  exit 2
fi

mkdir -p "$dir/tokens"
chmod 700 "$dir" "$dir/tokens"
dir=$(cd "$dir" && pwd)
conf=$dir/softhsm2.conf
if [ ! -f "$conf" ]; then
  cat >"$conf" <<CONF
# SoftHSM 2 configuration written by kms-sidecar hsm/softhsm-token.sh
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
fi
export SOFTHSM2_CONF=$conf

if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+$label[[:space:]]*\$"; then
  echo "token \"$label\" already exists in $dir/tokens" >&2
else
  softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$user_pin" >&2
fi

pin_file=$dir/$label.pin
(umask 077 && printf '%s\n' "$user_pin" >"$pin_file")
echo "token \"$label\": user PIN in $pin_file, SO PIN \"$so_pin\"" >&2
echo "export SOFTHSM2_CONF=$conf"
