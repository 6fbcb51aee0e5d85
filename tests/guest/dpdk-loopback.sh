#!/usr/bin/env bash
# Reference run: DPDK testpmd's vhost PMD as a loopback vhost-user-net backend (io forwarding,
# loop topology: every frame the guest sends comes back unchanged on the same port and queue),
# then run-guest.sh against it. Validates the guest client without vmdev.
# Usage: tests/guest/dpdk-loopback.sh --kernel K --initrd I [--queues N] [other run-guest.sh options]
set -euo pipefail

die() { echo "dpdk-loopback: error: $*" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
command -v dpdk-testpmd >/dev/null || die "dpdk-testpmd not found (apt-get install dpdk)"

QUEUES=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [ "${args[i]}" != --queues ] || QUEUES=${args[i + 1]:-1}
done

DIR=$(mktemp -d /tmp/vmdev-dpdk.XXXXXX)
SOCK="$DIR/vhost-user.sock"
PREFIX="vmdev-guest-$$"
PID=""
cleanup() {
    if [ -n "$PID" ]; then
        kill -INT "$PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# One forwarding lcore (core 1) busy-polls; the main lcore (core 0) only prints stats.
dpdk-testpmd -l 0,1 --no-pci --no-huge -m 1024 --file-prefix="$PREFIX" \
    --vdev "net_vhost0,iface=$SOCK,queues=$QUEUES" -- \
    --forward-mode=io --port-topology=loop --rxq="$QUEUES" --txq="$QUEUES" \
    --total-num-mbufs=16384 --stats-period 1 </dev/null >"$DIR/testpmd.log" 2>&1 &
PID=$!
for _ in $(seq 100); do
    [ -S "$SOCK" ] && break
    kill -0 "$PID" 2>/dev/null || { tail -n 20 "$DIR/testpmd.log" >&2; die "dpdk-testpmd exited"; }
    sleep 0.1
done
[ -S "$SOCK" ] || die "dpdk-testpmd made no socket $SOCK in 10 s (log: $DIR/testpmd.log)"

rc=0
"$HERE/run-guest.sh" --vhost-user "$SOCK" "$@" || rc=$?
echo "dpdk-loopback: testpmd log $DIR/testpmd.log" >&2
exit "$rc"
