#!/usr/bin/env bash
# What moving a device costs its driver, one command: starts vmdev-control and two
# datapaths (dp0 pinned to the last CPU, dp1 unpinned), a net-loopback device on dp0, then
#   vmdev-perf migrate    — frames stream while the device moves dp0 <-> dp1 MOVES times:
#                           the pause the driver sees per move, p50/p99/max;
#   vmdev-perf dirty-log  — throughput with dirty logging off and on, alternating, same run.
#
# usage: perf/migration.sh [MOVES=20] [SIZE=64]
set -euo pipefail
cd "$(dirname "$0")/.."
MOVES=${1:-20}; SIZE=${2:-64}
. perf/daemons.sh migration
start_datapath dp0 "${DP_ARGS[@]}"
start_datapath dp1
UUID=$("$B/vmdevctl" --run-dir "$RUN" start -p dp0 -t net-loopback --attr queue-size=256)
echo "== migrate ($MOVES moves, $SIZE-byte frames)"
"$B/vmdev-perf" migrate --run-dir "$RUN" -u "$UUID" --to dp1 --moves "$MOVES" --size "$SIZE" "${CLIENT_ARGS[@]}"
echo
"$B/vmdevctl" --run-dir "$RUN" list
echo
echo "== dirty logging off vs on ($SIZE-byte frames)"
"$B/vmdev-perf" dirty-log --run-dir "$RUN" -u "$UUID" --size "$SIZE" "${CLIENT_ARGS[@]}"
echo
echo "== dirty logging off vs on (1514-byte frames)"
"$B/vmdev-perf" dirty-log --run-dir "$RUN" -u "$UUID" --size 1514 "${CLIENT_ARGS[@]}"
