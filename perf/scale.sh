#!/usr/bin/env bash
# One datapath thread under many devices, and an idle device's cost, one command: starts
# vmdev-control and dp0 (pinned to the last CPU), then
#   vmdev-perf scale  — aggregate round-trip rate with 1, 8 and 64 devices (one driver thread);
#   vmdev-perf idle   — the datapath's CPU while a device idles, and its wake-up.
# usage: perf/scale.sh [COUNTS=1,8,64] [SECONDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${1:-1,8,64}; SECS=${2:-3}
. perf/daemons.sh scale
# Guest memory asks for transparent huge pages (madvise); shared memory gets them only if
# shmem_enabled allows. With `never`, 64 devices thrash the datapath's TLB: set `advise` for
# this run (root only) and put the old value back at exit.
THP=/sys/kernel/mm/transparent_hugepage/shmem_enabled
OLD_THP=$(grep -o '\[[a-z_]*\]' "$THP" 2>/dev/null | tr -d '[]' || true)
if [ "$OLD_THP" = never ] && [ -w "$THP" ]; then
  echo advise > "$THP"
  trap 'echo never > "$THP"; cleanup' EXIT
  echo "shmem_enabled: never -> advise for this run"
else
  echo "shmem_enabled: ${OLD_THP:-unknown}"
fi
start_datapath dp0 "${DP_ARGS[@]}"
echo "== scale"
"$B/vmdev-perf" scale --run-dir "$RUN" -p dp0 --devices "$COUNTS" --seconds "$SECS" "${CLIENT_ARGS[@]}"
echo
echo "== idle"
UUID=$("$B/vmdevctl" --run-dir "$RUN" start -p dp0 -t net-loopback --attr queue-size=256)
"$B/vmdev-perf" idle --run-dir "$RUN" -u "$UUID" "${CLIENT_ARGS[@]}"
