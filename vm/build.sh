#!/usr/bin/env bash
# Builds what the guest boots, from the kernel that setup.sh cached:
#   - dmatx-guest, the test harness (vm/guest), as a static binary: release,
#     x86_64-unknown-linux-gnu, RUSTFLAGS=-C target-feature=+crt-static, in its own target dir
#     (default target/guest, so the host build's cache keeps its flags);
#   - $WORK/vmlinuz and $WORK/initramfs.cpio: busybox, dmatx-guest, vm/guest-init.sh as /init,
#     and the VFIO modules that vfio-pci and vfio_iommu_type1 need, in dependency order
#     (listed in /lib/modules/order; modules built into the kernel are left out).
# Env: DMATX_VM_WORK (default target/vm), DMATX_VM_GUEST_TARGET_DIR (default target/guest).
# Exit 0 built, 1 failed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
phase_start
require_linux_x86_64

KPKG=$(cat "$WORK/kernel-current" 2>/dev/null) || vm_die "no kernel in $WORK: run vm/setup.sh first"
KDIR="$WORK/kernel-$KPKG"
[ -d "$KDIR/lib/modules" ] || vm_die "$KDIR is not an extracted kernel package: rerun vm/setup.sh"
KVER=$(ls "$KDIR/lib/modules" | head -1)
MODDIR="$KDIR/lib/modules/$KVER"

# --- the harness ------------------------------------------------------------------------------
GUEST_TARGET="${DMATX_VM_GUEST_TARGET_DIR:-$REPO/target/guest}"
TRIPLE=x86_64-unknown-linux-gnu
vm_say "cargo build --release -p dmatx-guest --target $TRIPLE (static, CARGO_TARGET_DIR=$GUEST_TARGET)"
if ! (cd "$REPO" && CARGO_TARGET_DIR="$GUEST_TARGET" RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --quiet -p dmatx-guest --target "$TRIPLE"); then
    vm_die "building dmatx-guest failed"
fi
BIN="$GUEST_TARGET/$TRIPLE/release/dmatx-guest"
if ! is_static "$BIN"; then
    vm_die "$BIN is dynamically linked; it cannot run in the busybox initramfs"
fi
phase_done cargo

# --- modules in dependency order --------------------------------------------------------------
# The dependencies come from each module's .modinfo section (`depends=a,b`), read without
# modinfo; names compare with `-` and `_` alike, as the kernel does.
norm() { echo "${1//-/_}"; }
declare -A MODFILE=() BUILTIN=() DONE=()
while IFS= read -r f; do
    name=${f##*/} name=${name%%.ko*}
    MODFILE[${name//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*')
if [ -f "$MODDIR/modules.builtin" ]; then
    while IFS= read -r f; do
        name=${f##*/} name=${name%%.ko*}
        BUILTIN[${name//-/_}]=1
    done < "$MODDIR/modules.builtin"
fi
ORDER=()
ko_text() { # the module file, decompressed, on stdout
    case "$1" in
        *.ko) cat "$1" ;;
        *.ko.xz) xz -dc "$1" ;;
        *.ko.zst) zstd -qdc "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
        *) vm_die "unknown module file type: $1" ;;
    esac
}
add_module() { # post-order walk: dependencies first
    local m
    m=$(norm "$1")
    [ -z "${DONE[$m]:-}" ] || return 0
    DONE[$m]=1
    if [ -n "${BUILTIN[$m]:-}" ]; then vm_say "module $m: built into $KVER"; return 0; fi
    [ -n "${MODFILE[$m]:-}" ] || vm_die "module $m is neither in $KPKG nor built into it"
    local deps d
    deps=$(ko_text "${MODFILE[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -1)
    for d in ${deps//,/ }; do add_module "$d"; done
    ORDER+=("$m")
}
for m in vfio-pci vfio_iommu_type1; do add_module "$m"; done
vm_say "modules, in load order: ${ORDER[*]:-none}"

# --- initramfs --------------------------------------------------------------------------------
R="$WORK/rootfs"
rm -rf "$R"
mkdir -p "$R"/{bin,dev,proc,sys,tmp,lib/modules}
cp /bin/busybox "$R/bin/busybox"
cp "$BIN" "$R/bin/dmatx-guest"
install -m 0755 "$VM_DIR/guest-init.sh" "$R/init"
: > "$R/lib/modules/order"
for m in "${ORDER[@]}"; do
    ko_text "${MODFILE[$m]}" > "$R/lib/modules/$m.ko"
    echo "$m" >> "$R/lib/modules/order"
done
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$WORK/initramfs.cpio.tmp"
mv "$WORK/initramfs.cpio.tmp" "$WORK/initramfs.cpio"
cp "$KDIR/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
vm_say "kernel $KVER, initramfs $(( $(stat -c %s "$WORK/initramfs.cpio") / 1024 )) KiB (dmatx-guest $(( $(stat -c %s "$BIN") / 1024 )) KiB)"
phase_done initramfs
phases_report build
