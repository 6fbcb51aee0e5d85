#!/usr/bin/env bash
# Benchmarks people can read, one command: starts vmdev-control and a pinned vmdev-datapath,
# a net-loopback device (MTU 1504, so 1518-byte frames fit), and runs `vmdev-perf report`:
# perf/report/results.json plus SVG charts (latency CDF, throughput by frame size and batch).
# usage: perf/report.sh [OUT=perf/report]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-perf/report}
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q --workspace --bins
B=$PWD/target/release
RUN=$(mktemp -d /tmp/vmdev-report.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$RUN"
}
trap cleanup EXIT
NCPU=$(nproc)
DP_ARGS=(); CLIENT_ARGS=()
if [ "$NCPU" -ge 2 ]; then DP_ARGS=(--cpu $((NCPU - 1))); CLIENT_ARGS=(--cpu 0); fi
export VMDEV_LOG=${VMDEV_LOG:-warn}
"$B/vmdev-control" --run-dir "$RUN" & PIDS+=($!)
for _ in $(seq 200); do [ -S "$RUN/control.sock" ] && break; sleep 0.05; done
"$B/vmdev-datapath" --run-dir "$RUN" --name dp0 "${DP_ARGS[@]}" & PIDS+=($!)
for _ in $(seq 200); do "$B/vmdevctl" --run-dir "$RUN" types 2>/dev/null | grep -q '^dp0' && break; sleep 0.05; done
UUID=$("$B/vmdevctl" --run-dir "$RUN" start -p dp0 -t net-loopback --attr mtu=1504,queue-size=256)
"$B/vmdev-perf" report --run-dir "$RUN" -u "$UUID" --out "$OUT" "${CLIENT_ARGS[@]}"
