#!/usr/bin/env bash
# The vmdev test command: formatting, lints, then every unit, property and end-to-end test
# (the end-to-end tests start the real daemons, so the binaries are built first).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace -- --test-threads="${VMDEV_TEST_THREADS:-2}"
