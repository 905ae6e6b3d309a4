#!/usr/bin/env bash
# Runs every test of the project: Rust unit, integration (in-process, simulated and
# multi-process over QUIC on 127.0.0.1), doc tests, and lints. Exits non-zero on any
# failure. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo build (all targets)"
cargo build --workspace --all-targets --locked

echo "== cargo test"
cargo test --workspace --locked -- --test-threads=2

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo fmt --check"
cargo fmt --all -- --check
