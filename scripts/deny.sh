#!/usr/bin/env bash
# Dependency policy (deny.toml): licenses, duplicate versions and sources, offline.
# Not part of the test command: installing cargo-deny takes about 5 minutes. Advisories are left
# out because their database cannot be fetched here; pass `advisories` with a local database
# (cargo deny check advisories --disable-fetch, db in ~/.cargo/advisory-dbs) where it can be.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deny >/dev/null || cargo install cargo-deny --locked
checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(bans licenses sources)
exec cargo deny --offline check "${checks[@]}"
