#!/usr/bin/env bash
# One command: DPDK's own vhost-user loopback vs vmdev, back to back, same cores, same
# frame sizes. A and B: the client is testpmd with the virtio-user PMD (io forwarding,
# `start tx_first`) on CPU 1; the backend is testpmd's vhost PMD (A) or vmdev's vhost-user
# door + vmdev-datapath (B), on CPU 0; the client's per-second Rx-pps is the round-trip rate
# (median of seconds 3..SECONDS). C: vmdev's own driver (vmdev-perf throughput) on CPU 1,
# copying every frame in and out; D: the same on packed rings; E: the same driver forwarding
# like testpmd's io mode (32 frames circulate, no copy in the driver: the like-for-like
# counterpart of A's client).
# Prints median and spread over runs and the ratios vmdev/DPDK.
#
# usage: perf/compare-dpdk.sh [RUNS=3] [SECONDS=8] [SIZES="64 1518"]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}; SECS=${2:-8}; SIZES=${3:-"64 1518"}
command -v dpdk-testpmd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev >/dev/null; }
cargo build --release -q --workspace --bins
B=$PWD/target/release
W=$(mktemp -d /tmp/vmdev-compare.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

# client SOCK SIZE -> prints the median Rx-pps of seconds 3..SECS
client() {
  local sock=$1 size=$2 out=$W/client.log
  sleep "$SECS" | timeout $((SECS + 30)) dpdk-testpmd -l 0,1 --main-lcore 0 --no-pci --no-huge -m 1024 \
    --file-prefix=vmdev-cmp-vu --vdev "net_virtio_user0,path=$sock,queues=1" -- \
    --forward-mode=io --auto-start --tx-first --nb-cores=1 --txpkts="$size" \
    --total-num-mbufs=4096 --stats-period 1 >"$out" 2>&1 || true
  grep -o 'Rx-pps: *[0-9]*' "$out" | awk '{print $2}' | tail -n +3 | sort -n |
    awk '{a[NR]=$1} END {if (NR==0) print 0; else print a[int((NR+1)/2)]}'
}

run_dpdk() {
  local size=$1 sock=$W/dpdk.sock
  rm -f "$sock"
  # testpmd exits when its stdin closes: keep it open for the run.
  dpdk-testpmd -l 0,1 --main-lcore 1 --no-pci --no-huge -m 1024 \
    --file-prefix=vmdev-cmp-vh --vdev "net_vhost0,iface=$sock,queues=1" -- --forward-mode=io \
    --auto-start --nb-cores=1 --total-num-mbufs=4096 < <(sleep $((SECS + 60))) >"$W/vhost.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  client "$sock" "$size"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

run_vmdev() {
  local size=$1 run=$W/run sock=$W/run/vu.sock
  mkdir -p "$run"
  VMDEV_LOG=warn "$B/vmdev-control" --run-dir "$run" & local ctl=$!; PIDS+=("$ctl")
  for _ in $(seq 100); do [ -S "$run/control.sock" ] && break; sleep 0.05; done
  VMDEV_LOG=warn "$B/vmdev-datapath" --run-dir "$run" --name dp0 --cpu 0 & local dp=$!; PIDS+=("$dp")
  for _ in $(seq 100); do "$B/vmdevctl" --run-dir "$run" types 2>/dev/null | grep -q '^dp0' && break; sleep 0.05; done
  "$B/vmdevctl" --run-dir "$run" start -p dp0 -t net-loopback --vhost-user "$sock" \
    --attr unsealed-memory=accept >/dev/null
  client "$sock" "$size"
  kill "$ctl" 2>/dev/null; wait "$ctl" "$dp" 2>/dev/null || true
  rm -rf "$run"
}

# vmdev's own driver (vmdev-perf throughput, vmdev protocol) on CPU 1, vmdev-datapath on CPU 0.
run_vmdev_own() {
  local size=$1 run=$W/run-own extra=${2:-}
  mkdir -p "$run"
  VMDEV_LOG=warn "$B/vmdev-control" --run-dir "$run" & local ctl=$!; PIDS+=("$ctl")
  for _ in $(seq 100); do [ -S "$run/control.sock" ] && break; sleep 0.05; done
  VMDEV_LOG=warn "$B/vmdev-datapath" --run-dir "$run" --name dp0 --cpu 0 & local dp=$!; PIDS+=("$dp")
  for _ in $(seq 100); do "$B/vmdevctl" --run-dir "$run" types 2>/dev/null | grep -q '^dp0' && break; sleep 0.05; done
  local uuid
  uuid=$("$B/vmdevctl" --run-dir "$run" start -p dp0 -t net-loopback --attr mtu=1504)
  "$B/vmdev-perf" throughput --run-dir "$run" -u "$uuid" --size "$size" --seconds "$((SECS - 2))" \
    --cpu 1 --floor-iters 0 --json $extra 2>/dev/null |
    sed -n 's/.*"frames_per_s": \([0-9.]*\).*/\1/p' | awk '{printf "%d\n", $1} END {if (NR==0) print 0}'
  kill "$ctl" 2>/dev/null; wait "$ctl" "$dp" 2>/dev/null || true
  rm -rf "$run"
}

stats() { # values... -> "median min max"
  printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)], a[1], a[NR]}'
}

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
echo "A: DPDK loopback   testpmd virtio-user (io, tx_first) on CPU 1 -> testpmd vhost PMD (io) on CPU 0"
echo "B: vmdev door      testpmd virtio-user (io, tx_first) on CPU 1 -> vmdev vhost-user door + vmdev-datapath on CPU 0"
echo "C: vmdev own       vmdev-perf throughput (vmdev's driver, vmdev protocol) on CPU 1 -> vmdev-datapath on CPU 0"
echo "D: vmdev packed    as C with packed virtqueues (--packed)"
echo "E: vmdev own, io   as C, forwarding like testpmd io after tx_first: 32 frames circulate, no copy in the driver (--forward 32)"
echo "$RUNS runs x ${SECS}s each, back to back (A B C D A B C D ...); round-trip Mframes/s: median (min-max)"
printf '%-6s %-20s %-20s %-20s %-20s %-20s %-6s %-6s %-6s %s\n' size "A: DPDK" "B: vmdev door" "C: vmdev own" "D: vmdev packed" "E: vmdev own, io" "B/A" "C/A" "D/A" "E/A"
for size in $SIZES; do
  d=(); v=(); o=(); p=(); e=()
  for _ in $(seq "$RUNS"); do
    d+=("$(run_dpdk "$size")")
    v+=("$(run_vmdev "$size")")
    o+=("$(run_vmdev_own "$size")")
    p+=("$(run_vmdev_own "$size" --packed)")
    e+=("$(run_vmdev_own "$size" "--forward 32")")
  done
  read -r dm dlo dhi <<<"$(stats "${d[@]}")"
  read -r vm vlo vhi <<<"$(stats "${v[@]}")"
  read -r om olo ohi <<<"$(stats "${o[@]}")"
  read -r pm plo phi <<<"$(stats "${p[@]}")"
  read -r em elo ehi <<<"$(stats "${e[@]}")"
  awk -v s="$size" -v dm="$dm" -v dlo="$dlo" -v dhi="$dhi" -v vm="$vm" -v vlo="$vlo" -v vhi="$vhi" \
      -v om="$om" -v olo="$olo" -v ohi="$ohi" -v pm="$pm" -v plo="$plo" -v phi="$phi" \
      -v em="$em" -v elo="$elo" -v ehi="$ehi" 'BEGIN {
    printf "%-6s %5.2f (%5.2f-%5.2f)  %5.2f (%5.2f-%5.2f)  %5.2f (%5.2f-%5.2f)  %5.2f (%5.2f-%5.2f)  %5.2f (%5.2f-%5.2f)  %-6.2f %-6.2f %-6.2f %.2f\n",
      s, dm/1e6, dlo/1e6, dhi/1e6, vm/1e6, vlo/1e6, vhi/1e6, om/1e6, olo/1e6, ohi/1e6,
      pm/1e6, plo/1e6, phi/1e6, em/1e6, elo/1e6, ehi/1e6,
      (dm > 0 ? vm/dm : 0), (dm > 0 ? om/dm : 0), (dm > 0 ? pm/dm : 0), (dm > 0 ? em/dm : 0) }'
done
