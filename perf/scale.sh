#!/usr/bin/env bash
# One datapath thread under many devices, and an idle device's cost, one command: starts
# vmdev-control and dp0 (pinned to the last CPU), then
#   vmdev-perf scale  — aggregate round-trip rate with 1, 8 and 64 devices (one driver thread);
#   vmdev-perf idle   — the datapath's CPU while a device idles, and its wake-up.
# usage: perf/scale.sh [COUNTS=1,8,64] [SECONDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${1:-1,8,64}; SECS=${2:-3}
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q --workspace --bins
B=$PWD/target/release
RUN=$(mktemp -d /tmp/vmdev-scale.XXXXXX)
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
echo "== scale"
"$B/vmdev-perf" scale --run-dir "$RUN" -p dp0 --devices "$COUNTS" --seconds "$SECS" "${CLIENT_ARGS[@]}"
echo
echo "== idle"
UUID=$("$B/vmdevctl" --run-dir "$RUN" start -p dp0 -t net-loopback --attr queue-size=256)
"$B/vmdev-perf" idle --run-dir "$RUN" -u "$UUID" "${CLIENT_ARGS[@]}"
