#!/usr/bin/env bash
# One command: DPDK's own vhost-user loopback vs vmdev, back to back, same cores, same
# frame sizes. A and B: the client is testpmd with the virtio-user PMD (io forwarding,
# `start tx_first`) on CPU 1; the backend is testpmd's vhost PMD (A) or vmdev's vhost-user
# door + vmdev-datapath (B), on CPU 0; the client's per-second Rx-pps is the round-trip rate
# (each second from the 3rd). C: vmdev's own driver (vmdev-perf throughput) on CPU 1,
# copying every frame in and out; D: the same on packed rings; E: the same driver forwarding
# like testpmd's io mode (32 frames circulate, no copy in the driver: the like-for-like
# counterpart of A's client); F: B with packed virtqueues (virtio-user `packed_vq=1`), to
# set against B for packed vs split with the same driver.
# Prints each run's median and, over every second of every run, p10 / p50 / p90 per column
# and their ratios to A; then each run's median over the A run of its round (same minute).
#
# This machine flips, within seconds, between a quiet mode and a slow mode in which every
# cross-core cache miss costs ~3-4x (the shared-memory ping-pong floor jumps between ~120 and
# ~450 ns; perf/RESULTS.md). A median of a few runs lands on whichever mode they hit, so the
# unit here is one second: every column records its per-second rate, and the table compares
# columns at the 10th, 50th and 90th percentile of all their seconds (p10 ~ slow mode, p90
# ~ quiet mode). Each run line also prints the shm floor measured just before and after it.
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
RESTORE=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  for r in "${RESTORE[@]}"; do eval "$r" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

# Memory as each side would have it in production: DPDK in 2 MiB hugepages (hugetlbfs; with
# 4 KiB pages its loopback runs ~30 % slower here), vmdev's guest memory in transparent huge
# pages (shmem_enabled=advise). As root the script reserves and mounts what is missing and
# undoes it at exit; otherwise DPDK runs with --no-huge and the header says so.
HP=/proc/sys/vm/nr_hugepages THP=/sys/kernel/mm/transparent_hugepage/shmem_enabled
DPDK_MEM=(--no-huge -m 1024); MEM_NOTE="DPDK in 4 KiB pages (--no-huge: not root or no hugepages)"
if [ "$(id -u)" = 0 ] && [ -w "$HP" ]; then
  need=1100 # 2 MiB pages: 1 GiB for each of the two testpmd processes, and some slack
  free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
  if [ "$free" -lt "$need" ]; then
    old=$(cat "$HP"); echo $((old + need - free)) >"$HP"; RESTORE+=("echo $old > $HP")
  fi
  if ! grep -q 'hugetlbfs.*pagesize=2M' /proc/mounts; then
    mkdir -p "$W/huge" && mount -t hugetlbfs -o pagesize=2M nodev "$W/huge" && RESTORE=("umount $W/huge" "${RESTORE[@]}")
  fi
  if [ "$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)" -ge "$need" ] && grep -q 'hugetlbfs.*pagesize=2M' /proc/mounts; then
    # One file per memseg list: virtio-user hands vhost-user one region per file (8 at most).
    DPDK_MEM=(-m 1024 --single-file-segments); MEM_NOTE="DPDK in 2 MiB hugepages (hugetlbfs)"
  fi
  if grep -q '\[never\]' "$THP" 2>/dev/null; then echo advise >"$THP"; RESTORE+=("echo never > $THP"); fi
fi
MEM_NOTE="$MEM_NOTE; vmdev's guest memory: shmem_enabled $(grep -o '\[[a-z_]*\]' "$THP" 2>/dev/null | tr -d '[]')"

# client SOCK SIZE [VDEV_EXTRA] -> prints the Rx-pps of each second from the 3rd, SECS-3 of them (the
# first two ramp up, the last ones wind down when testpmd's stdin closes).
client() {
  local sock=$1 size=$2 extra=${3:-} out=$W/client.log
  sleep "$SECS" | timeout $((SECS + 30)) dpdk-testpmd -l 0,1 --main-lcore 0 --no-pci "${DPDK_MEM[@]}" \
    --file-prefix=vmdev-cmp-vu --vdev "net_virtio_user0,path=$sock,queues=1$extra" -- \
    --forward-mode=io --auto-start --tx-first --nb-cores=1 --txpkts="$size" \
    --total-num-mbufs=4096 --stats-period 1 >"$out" 2>&1 || true
  grep -o 'Rx-pps: *[0-9]*' "$out" | awk '{print $2}' | tail -n +3 | head -n $((SECS - 3))
}

run_dpdk() {
  local size=$1 sock=$W/dpdk.sock
  rm -f "$sock"
  # testpmd exits when its stdin closes: keep it open for the run.
  dpdk-testpmd -l 0,1 --main-lcore 1 --no-pci "${DPDK_MEM[@]}" \
    --file-prefix=vmdev-cmp-vh --vdev "net_vhost0,iface=$sock,queues=1" -- --forward-mode=io \
    --auto-start --nb-cores=1 --total-num-mbufs=4096 < <(sleep $((SECS + 60))) >"$W/vhost.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  client "$sock" "$size"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

run_vmdev() {
  local size=$1 extra=${2:-} run=$W/run sock=$W/run/vu.sock
  mkdir -p "$run"
  VMDEV_LOG=warn "$B/vmdev-control" --run-dir "$run" & local ctl=$!; PIDS+=("$ctl")
  for _ in $(seq 100); do [ -S "$run/control.sock" ] && break; sleep 0.05; done
  VMDEV_LOG=warn "$B/vmdev-datapath" --run-dir "$run" --name dp0 --cpu 0 & local dp=$!; PIDS+=("$dp")
  for _ in $(seq 100); do "$B/vmdevctl" --run-dir "$run" types 2>/dev/null | grep -q '^dp0' && break; sleep 0.05; done
  "$B/vmdevctl" --run-dir "$run" start -p dp0 -t net-loopback --vhost-user "$sock" \
    --attr unsealed-memory=accept >/dev/null
  client "$sock" "$size" "$extra"
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
    tr -d ' \n' | sed -n 's/.*"per_second":\[\([0-9.,e+]*\)\].*/\1/p' | tr ',' '\n' | head -n $((SECS - 3)) |
    awk '{printf "%d\n", $1}'
  kill "$ctl" 2>/dev/null; wait "$ctl" "$dp" 2>/dev/null || true
  rm -rf "$run"
}

# floor -> the shared-memory ping-pong's p50 in ns between the two CPUs the runs use.
floor() {
  "$B/vmdev-perf" floors --only shm --iters 20000 --cpus 1,0 --json |
    sed -n 's/.*"p50_ns": \([0-9]*\).*/\1/p'
}

# measure SIZE COL CMD... -> runs CMD (which prints one rate per second) between two
# floors; appends "size col rate" per second to secs.txt and prints the run's median.
measure() {
  local size=$1 col=$2 f0 f1 rates
  shift 2
  f0=$(floor)
  rates=$("$@")
  f1=$(floor)
  printf '%s\n' "$rates" | awk -v s="$size" -v c="$col" 'NF {print s, c, $1}' >>"$W/secs.txt"
  printf '%s\n' "$rates" | sort -n | awk -v s="$size" -v c="$col" -v f0="$f0" -v f1="$f1" -v runs="$W/runs.txt" '
    NF {a[++n] = $1}
    END {if (n) print s, c, a[int((n + 1) / 2)] >>runs
      printf "  run: %-5s %s  median %5.2f Mframes/s over %d s (%5.2f-%5.2f)   shm floor %4d -> %4d ns\n",
      s, c, n ? a[int((n + 1) / 2)] / 1e6 : 0, n, n ? a[1] / 1e6 : 0, n ? a[n] / 1e6 : 0, f0, f1}'
}

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
echo "A: DPDK loopback   testpmd virtio-user (io, tx_first) on CPU 1 -> testpmd vhost PMD (io) on CPU 0"
echo "B: vmdev door      testpmd virtio-user (io, tx_first) on CPU 1 -> vmdev vhost-user door + vmdev-datapath on CPU 0"
echo "C: vmdev own       vmdev-perf throughput (vmdev's driver, vmdev protocol) on CPU 1 -> vmdev-datapath on CPU 0"
echo "D: vmdev packed    as C with packed virtqueues (--packed)"
echo "E: vmdev own, io   as C, forwarding like testpmd io after tx_first: 32 frames circulate, no copy in the driver (--forward 32)"
echo "F: vmdev door, packed   as B with packed virtqueues (virtio-user packed_vq=1)"
echo "memory: $MEM_NOTE"
echo "$RUNS runs x ${SECS}s each, back to back (A B C D E F A B ...), shm floor before and after each"
: >"$W/secs.txt"; : >"$W/runs.txt"
for size in $SIZES; do
  for _ in $(seq "$RUNS"); do
    measure "$size" A run_dpdk "$size"
    measure "$size" B run_vmdev "$size"
    measure "$size" C run_vmdev_own "$size"
    measure "$size" D run_vmdev_own "$size" --packed
    measure "$size" E run_vmdev_own "$size" "--forward 32"
    measure "$size" F run_vmdev "$size" ,packed_vq=1
  done
done

# The unit is one second of one run. p10 stands for the machine's slow mode, p90 for its
# quiet mode, p50 for wherever the runs mostly fell; a column beats A in a mode when its
# percentile beats A's. Then the same minute: each run's median over the median of the A
# run of its round (the runs of a round are back to back, so both met the machine in the
# same mode, most of the time).
echo
echo "round-trip Mframes/s over every measured second of every run: p10 / p50 / p90 (seconds);"
echo "ratios to A at the same percentile"
awk '
  # Sorts a[1..m] in place (mawk has no asort).
  function isort(a, m,   i, j, t) {
    for (i = 2; i <= m; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
  }
  function pct(k, q,   m, i, a) {
    m = n[k]; for (i = 1; i <= m; i++) a[i] = v[k, i]
    isort(a, m); return a[int(q * (m - 1) + 0.5) + 1]
  }
  FNR == NR { k = $1 SUBSEP $2; v[k, ++n[k]] = $3; if (!($1 in seen)) { seen[$1] = 1; sizes[++ns] = $1 }; next }
  { k = $1 SUBSEP $2; med[k, ++nr[k]] = $3 }
  END {
    printf "%-6s %-4s %-26s %s\n", "size", "col", "p10 / p50 / p90", "vs A: p10 / p50 / p90"
    for (s = 1; s <= ns; s++) {
      size = sizes[s]; ka = size SUBSEP "A"
      if (n[ka]) { a10 = pct(ka, .1); a50 = pct(ka, .5); a90 = pct(ka, .9) }
      for (c = 1; c <= 6; c++) {
        col = substr("ABCDEF", c, 1); k = size SUBSEP col
        if (!n[k]) continue
        x10 = pct(k, .1); x50 = pct(k, .5); x90 = pct(k, .9)
        r = (col == "A" || !n[ka]) ? "" : sprintf("%.2f / %.2f / %.2f", x10 / a10, x50 / a50, x90 / a90)
        printf "%-6s %-4s %5.2f / %5.2f / %5.2f (%3d)  %s\n", size, col, x10 / 1e6, x50 / 1e6, x90 / 1e6, n[k], r
      }
    }
    print ""
    print "each run'"'"'s median over that round'"'"'s A run (same minute), and the median of those ratios"
    for (s = 1; s <= ns; s++) {
      size = sizes[s]; ka = size SUBSEP "A"
      for (c = 2; c <= 6; c++) {
        col = substr("ABCDEF", c, 1); k = size SUBSEP col; line = ""; cnt = 0
        for (r = 1; r <= nr[k] && r <= nr[ka]; r++) if (med[ka, r] > 0) { x[++cnt] = med[k, r] / med[ka, r]; line = line sprintf(" %.2f", x[cnt]) }
        if (!cnt) continue
        isort(x, cnt)
        printf "%-6s %-4s per run:%s   median %.2f\n", size, col, line, x[int((cnt + 1) / 2)]
      }
    }
  }' "$W/secs.txt" "$W/runs.txt"
