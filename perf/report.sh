#!/usr/bin/env bash
# Benchmarks people can read, one command: starts vmdev-control and a pinned vmdev-datapath,
# a net-loopback device (MTU 1504, so 1518-byte frames fit), and runs `vmdev-perf report`:
# perf/report/results.json plus SVG charts (latency CDF, throughput by frame size and batch).
# usage: perf/report.sh [OUT=perf/report]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-perf/report}
. perf/daemons.sh report
start_datapath dp0 "${DP_ARGS[@]}"
UUID=$("$B/vmdevctl" --run-dir "$RUN" start -p dp0 -t net-loopback --attr mtu=1504,queue-size=256)
"$B/vmdev-perf" report --run-dir "$RUN" -u "$UUID" --out "$OUT" "${CLIENT_ARGS[@]}"
