#!/usr/bin/env bash
# Boots the test guest (from build-image.sh) against a vhost-user-net backend and reports
# the guest's result line. Exit 0 only when the guest prints VMDEV-GUEST-RESULT: PASS.
# Usage: tests/guest/run-guest.sh --kernel K --initrd I --vhost-user SOCK
#            [--queues N] [--count N] [--mac M] [--timeout S] [--smp N] [--log FILE] [--test net|modules]
# The guest uses min(queues, vCPUs) queue pairs: pass --smp 2 to exercise two pairs.
set -euo pipefail

die() { echo "run-guest: error: $*" >&2; exit 2; }
usage() { die "usage: $0 --kernel K --initrd I --vhost-user SOCK [--queues N] [--count N] [--mac M] [--timeout S] [--smp N] [--log FILE] [--test net|modules]"; }

KERNEL="" INITRD="" SOCK="" QUEUES=1 COUNT=1000 MAC=52:54:00:12:34:56 TIMEOUT=120 LOG="" TEST=net SMP=1
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || usage
    case "$1" in
    --kernel) KERNEL=$2 ;;
    --initrd) INITRD=$2 ;;
    --vhost-user) SOCK=$2 ;;
    --queues) QUEUES=$2 ;;
    --count) COUNT=$2 ;;
    --mac) MAC=$2 ;;
    --timeout) TIMEOUT=$2 ;;
    --smp) SMP=$2 ;;
    --log) LOG=$2 ;;
    --test) TEST=$2 ;;
    *) usage ;;
    esac
    shift 2
done
[ -n "$KERNEL" ] && [ -n "$INITRD" ] || usage
[ -f "$KERNEL" ] || die "kernel $KERNEL not found (build it with tests/guest/build-image.sh)"
[ -f "$INITRD" ] || die "initrd $INITRD not found (build it with tests/guest/build-image.sh)"
for n in "$QUEUES" "$COUNT" "$TIMEOUT" "$SMP"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "not a positive number: $n"
done
command -v qemu-system-x86_64 >/dev/null ||
    die "qemu-system-x86_64 not found (tests/guest/build-image.sh installs it)"

NET=()
if [ "$TEST" = net ]; then
    [ -n "$SOCK" ] || die "--vhost-user SOCK is required for --test net"
    [ -S "$SOCK" ] || die "$SOCK is not a Unix socket (is the vhost-user backend running?)"
    DEV="virtio-net-pci,netdev=n0,mac=$MAC"
    [ "$QUEUES" -eq 1 ] || DEV="$DEV,mq=on,vectors=$((2 * QUEUES + 2))"
    NET=(-chardev "socket,id=c1,path=$SOCK"
        -netdev "vhost-user,id=n0,chardev=c1,queues=$QUEUES"
        -device "$DEV")
fi

if [ -z "$LOG" ]; then
    LOG="$(mktemp -d /tmp/vmdev-guest.XXXXXX)/serial.log"
fi
: >"$LOG"
QEMU_ERR="$LOG.qemu-stderr"

start=$EPOCHREALTIME
rc=0
# Guest RAM must be a shared memfd: vhost-user maps it in the backend.
timeout --kill-after=5 "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg -cpu max -smp "$SMP" -m 512M \
    -nodefaults -no-user-config -display none \
    -serial "file:$LOG" -monitor none -no-reboot \
    -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
    "${NET[@]}" \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 panic=-1 quiet vmdev.test=$TEST vmdev.count=$COUNT" \
    </dev/null 2>"$QEMU_ERR" || rc=$?
secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')

RESULT=$(tr -d '\r' <"$LOG" | grep -a -m1 '^VMDEV-GUEST-RESULT:' || true)
if [ "$rc" -eq 0 ] && [[ "$RESULT" == "VMDEV-GUEST-RESULT: PASS"* ]]; then
    echo "$RESULT"
    echo "run-guest: PASS in $secs s (serial log $LOG)"
    exit 0
fi

if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    why="timed out after $TIMEOUT s"
elif [ "$rc" -ne 0 ]; then
    why="qemu exited with status $rc"
elif [ -z "$RESULT" ]; then
    why="the guest printed no VMDEV-GUEST-RESULT line"
else
    why="the guest reported failure"
fi
[ -z "$RESULT" ] || echo "$RESULT"
{
    echo "run-guest: FAIL: $why ($secs s)"
    if [ -s "$QEMU_ERR" ]; then
        echo "---- qemu stderr ----"
        tail -n 20 "$QEMU_ERR"
    fi
    if [ -s "$LOG" ]; then
        echo "---- last 30 lines of the serial log ($LOG) ----"
        tail -n 30 "$LOG" | tr -d '\r'
    else
        echo "(the serial log is empty: the guest never started; a vhost-user backend that does"
        echo " not answer QEMU's handshake blocks QEMU before boot)"
    fi
} >&2
exit 1
