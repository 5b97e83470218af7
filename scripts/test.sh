#!/usr/bin/env bash
# Installs what the tests need (Rust components, the wasm32-wasip2 target the test guests are
# built for, PostgreSQL from Debian's packages) and runs every check: fmt, clippy -D warnings,
# and all tests against SQLite and a real PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup component add rustfmt clippy >/dev/null 2>&1 || rustup component add rustfmt clippy
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

source scripts/postgres.sh
pg_install
pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/provider-host-pg.XXXXXX")
cleanup() { pg_stop; rm -rf "$pg_dir"; }
trap cleanup EXIT
pg_start "$pg_dir"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
cargo test --workspace --all-features --locked
