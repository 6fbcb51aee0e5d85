#!/usr/bin/env bash
# vmdev quick start: build, start vmdev-control and a pinned vmdev-datapath, start a
# net-loopback device, run the driver client (latency histogram, throughput, each against
# the same-run floors), print the device counters, and shut everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "quickstart: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }

cargo build --release --workspace --bins
B=target/release
RUN=$(mktemp -d /tmp/vmdev-quickstart.XXXXXX)
PIDS=()
cleanup() {
  [ -n "${UUID:-}" ] && "$B/vmdevctl" --run-dir "$RUN" stop -u "$UUID" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$RUN"
}
trap cleanup EXIT

NCPU=$(nproc)
DP_ARGS=()
CLIENT_ARGS=()
if [ "$NCPU" -ge 2 ]; then
  DP_ARGS=(--cpu $((NCPU - 1)))
  CLIENT_ARGS=(--cpu 0)
fi

export VMDEV_LOG=${VMDEV_LOG:-warn}
"$B/vmdev-control" --run-dir "$RUN" & PIDS+=($!)
for _ in $(seq 200); do [ -S "$RUN/control.sock" ] && break; sleep 0.05; done
"$B/vmdev-datapath" --run-dir "$RUN" --name dp0 "${DP_ARGS[@]}" & PIDS+=($!)
for _ in $(seq 200); do "$B/vmdevctl" --run-dir "$RUN" types 2>/dev/null | grep -q '^dp0' && break; sleep 0.05; done

echo "== vmdevctl types"
"$B/vmdevctl" --run-dir "$RUN" types
UUID=$("$B/vmdevctl" --run-dir "$RUN" start -p dp0 -t net-loopback --attr queue-size=256)
echo "== vmdevctl list"
"$B/vmdevctl" --run-dir "$RUN" list
echo
echo "== latency (busy-polling driver and datapath)"
"$B/vmdev-perf" latency --run-dir "$RUN" -u "$UUID" --frames 100000 --size 64 "${CLIENT_ARGS[@]}"
echo
echo "== throughput, 64-byte frames"
"$B/vmdev-perf" throughput --run-dir "$RUN" -u "$UUID" --seconds 3 --size 64 "${CLIENT_ARGS[@]}"
echo
echo "== throughput, 1514-byte frames"
"$B/vmdev-perf" throughput --run-dir "$RUN" -u "$UUID" --seconds 3 --size 1514 --floor-iters 0 "${CLIENT_ARGS[@]}"
echo
echo "== vmdevctl stats"
"$B/vmdevctl" --run-dir "$RUN" stats -u "$UUID"
