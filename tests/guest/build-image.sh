#!/usr/bin/env bash
# Builds the Linux test guest for vmdev's vhost-user backend:
#   OUTDIR/vmlinuz    Debian bookworm-backports kernel
#   OUTDIR/initrd.gz  busybox + /init + virtio_net (and vdpa/vduse) modules + /bin/pkt-check
#                     + static vmdev-control, vmdev-datapath, vmdevctl, vmdev-perf
# Idempotent: missing packages are installed once, the kernel .deb is cached in OUTDIR,
# and the initramfs is reproducible (sorted paths, mtime 0, owner 0:0, gzip -n).
# Usage: tests/guest/build-image.sh OUTDIR
set -euo pipefail

die() { echo "build-image: error: $*" >&2; exit 1; }
log() { echo "build-image: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
mkdir -p "$1" || die "cannot create $1"
OUT=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# One build at a time per OUTDIR (tests run in parallel).
exec 9>"$OUT/.build.lock"
flock 9

# Modules the guest needs; their dependency closure is added from modinfo `depends=`.
MODULES="virtio_net vdpa vduse virtio_vdpa vhost_vdpa vhost vhost_iotlb irqbypass"

# ---- host packages --------------------------------------------------------------------
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
APT_READY=0
# Makes sure bookworm-backports is an apt source and its package lists are present.
apt_ready() {
    [ "$APT_READY" -eq 0 ] || return 0
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports to the apt sources"
        echo 'deb http://deb.debian.org/debian bookworm-backports main' |
            as_root tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null ||
            die "cannot write /etc/apt/sources.list.d/bookworm-backports.list"
        as_root apt-get update -qq || die "apt-get update failed"
    elif ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
        as_root apt-get update -qq || die "apt-get update failed"
    fi
    APT_READY=1
}
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=""
for p in busybox-static cpio xz-utils; do pkg_installed "$p" || missing="$missing $p"; done
if [ -n "$missing" ]; then
    apt_ready
    log "installing$missing"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing ||
        die "apt-get install$missing failed"
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
    apt_ready
    log "installing qemu-system-x86 from bookworm-backports"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        qemu-system-x86 || die "apt-get install -t bookworm-backports qemu-system-x86 failed"
fi
command -v cargo >/dev/null || die "cargo not found (install a Rust toolchain)"

# ---- kernel package -------------------------------------------------------------------
# linux-image-amd64 is a metapackage; download the image package it depends on.
DEB=$(ls "$OUT"/linux-image-*-amd64_*.deb 2>/dev/null | sort | tail -n 1 || true)
if [ -z "$DEB" ]; then
    apt_ready
    KPKG=$(apt-cache depends -t bookworm-backports linux-image-amd64 |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1 || true)
    [ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-amd64"
    log "downloading $KPKG (~106 MB)"
    # Download into a scratch folder so an interrupted download never looks cached.
    rm -rf "$OUT/download.tmp" && mkdir "$OUT/download.tmp"
    (cd "$OUT/download.tmp" && apt-get download -q -o APT::Sandbox::User=root \
        -t bookworm-backports "$KPKG") || die "apt-get download $KPKG failed"
    DEB=$(ls "$OUT"/download.tmp/"$KPKG"_*.deb 2>/dev/null | tail -n 1 || true)
    [ -n "$DEB" ] || die "downloaded $KPKG but found no .deb"
    mv "$DEB" "$OUT/" && rm -rf "$OUT/download.tmp"
    DEB="$OUT/${DEB##*/}"
fi
KROOT="$OUT/kernel-root"
if [ ! -f "$KROOT/.done" ] || [ "$(cat "$KROOT/.done")" != "$(basename "$DEB")" ]; then
    log "extracting $(basename "$DEB")"
    rm -rf "$KROOT"
    dpkg-deb -x "$DEB" "$KROOT" || die "dpkg-deb -x $DEB failed"
    basename "$DEB" >"$KROOT/.done"
fi
KVER=$(ls "$KROOT/lib/modules" | head -n 1)
[ -n "$KVER" ] || die "no lib/modules/KVER in $DEB"
cp "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"

# ---- guest test binary ----------------------------------------------------------------
log "building pkt-check (static)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
    --target x86_64-unknown-linux-gnu --manifest-path "$HERE/pkt-check/Cargo.toml" ||
    die "building pkt-check failed"
PKT_CHECK="$HERE/pkt-check/target/x86_64-unknown-linux-gnu/release/pkt-check"
# vmdev's own binaries run inside the guest for the VDUSE door (the host kernel has no vduse).
log "building vmdev-control, vmdev-datapath, vmdevctl, vmdev-perf (static) for the guest"
WORKSPACE=$(cd "$HERE/../.." && pwd)
VMDEV_BINS=(vmdev-control vmdev-datapath vmdevctl vmdev-perf)
if ! CARGO_TARGET_DIR="$OUT/cargo-target" RUSTFLAGS="-C target-feature=+crt-static" cargo build \
    --quiet --release --target x86_64-unknown-linux-gnu --manifest-path "$WORKSPACE/Cargo.toml" \
    $(printf -- '--bin %s ' "${VMDEV_BINS[@]}") 2>"$OUT/cargo-static.log"; then
    cat "$OUT/cargo-static.log" >&2
    die "building the vmdev binaries (static) failed"
fi
for b in "${VMDEV_BINS[@]}"; do
    [ -x "$OUT/cargo-target/x86_64-unknown-linux-gnu/release/$b" ] || die "building $b (static) failed"
done

# ---- initramfs tree -------------------------------------------------------------------
ROOT="$OUT/initramfs-root"
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,etc,root}
cp /bin/busybox "$ROOT/bin/busybox"
for applet in $("$ROOT/bin/busybox" --list); do
    [ -e "$ROOT/bin/$applet" ] || ln -s busybox "$ROOT/bin/$applet"
done
cp "$PKT_CHECK" "$ROOT/bin/pkt-check"
for b in "${VMDEV_BINS[@]}"; do
    cp "$OUT/cargo-target/x86_64-unknown-linux-gnu/release/$b" "$ROOT/bin/$b"
done
cp "$HERE/init" "$ROOT/init"
chmod 755 "$ROOT/init" "$ROOT/bin/pkt-check"

# Module name -> .ko.xz path (file names may spell `_` as `-`).
declare -A KO
while IFS= read -r f; do
    n=${f##*/}
    n=${n%.ko.xz}
    KO[${n//-/_}]=$f
done < <(cd "$KROOT/lib/modules/$KVER" && find kernel -name '*.ko.xz')
declare -A DONE
add_module() {
    local name=${1//-/_} path deps d
    [ -z "${DONE[$name]:-}" ] || return 0
    DONE[$name]=1
    path=${KO[$name]:-}
    [ -n "$path" ] || die "module $name not found in $KVER"
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$path")"
    xz -dc "$KROOT/lib/modules/$KVER/$path" >"$ROOT/lib/modules/$KVER/${path%.xz}"
    deps=$(tr '\0' '\n' <"$ROOT/lib/modules/$KVER/${path%.xz}" | sed -n 's/^depends=//p')
    for d in ${deps//,/ }; do add_module "$d"; done
}
for m in $MODULES; do add_module "$m"; done
"$ROOT/bin/busybox" depmod -b "$ROOT" "$KVER" || die "busybox depmod failed"
log "kernel $KVER, modules: $(echo "${!DONE[@]}" | tr ' ' '\n' | sort | tr '\n' ' ')"

# ---- reproducible cpio.gz -------------------------------------------------------------
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible | gzip -n -9 >"$OUT/initrd.gz.tmp") ||
    die "building the initramfs failed"
mv "$OUT/initrd.gz.tmp" "$OUT/initrd.gz"
log "done: $OUT/vmlinuz $OUT/initrd.gz ($(du -h "$OUT/initrd.gz" | cut -f1))"
