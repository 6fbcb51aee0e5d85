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
. perf/daemons.sh rings
start_datapath dp0 "${DP_ARGS[@]}"
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
