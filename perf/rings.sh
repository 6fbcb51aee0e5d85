#!/usr/bin/env bash
# Split against packed virtqueues in the same run, one command: starts vmdev-control and dp0
# (pinned to the last CPU), creates two net-loopback devices on it, and runs
#   vmdev-perf rings — vmdev's copying driver on both, split on one and packed on the other,
#   alternating every 50 ms, so that both see the same machine mode; prints each side's
#   rate and the packed/split ratio over neighbouring slices (p10 / p50 / p90),
# for each frame size, without and with VIRTIO_F_IN_ORDER.
# usage: perf/rings.sh [SECONDS=6] [SIZES="64 1518"]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-6}; SIZES=${2:-"64 1518"}
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q --workspace --bins
B=$PWD/target/release
RUN=$(mktemp -d /tmp/vmdev-rings.XXXXXX)
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
for size in $SIZES; do
  for order in "" --in-order; do
    # Fresh devices for each run (a device keeps the features its driver negotiated).
    S=$("$B/vmdevctl" --run-dir "$RUN" start -p dp0 -t net-loopback --attr mtu=1504)
    P=$("$B/vmdevctl" --run-dir "$RUN" start -p dp0 -t net-loopback --attr mtu=1504)
    "$B/vmdev-perf" rings --run-dir "$RUN" -u "$S" --packed-uuid "$P" --size "$size" \
      --seconds "$SECS" --floor-iters 0 $order "${CLIENT_ARGS[@]}"
    "$B/vmdevctl" --run-dir "$RUN" stop -u "$S" >/dev/null
    "$B/vmdevctl" --run-dir "$RUN" stop -u "$P" >/dev/null
    echo
  done
done
