#!/usr/bin/env bash
# Boots the guest that build.sh made and reports its verdict: QEMU q35 with an emulated Intel
# IOMMU (interrupt remapping, so kernel-irqchip=split), one edu and one nvme device (on a fresh
# temporary 16 MiB image), the serial console on standard output and in $WORK/serial.log.
# Exit 0 only if the guest printed `dmatx-guest: N passed, 0 failed` with N > 0, else 1.
#
# Env: DMATX_VM_WORK (default target/vm), DMATX_VM_ACCEL or ACCEL (tcg | kvm; default tcg),
#      DMATX_VM_SMP (default 2), DMATX_VM_MEM (default 512M), DMATX_VM_TIMEOUT (seconds, default
#      600), DMATX_VM_FILTER (run only the guest tests whose name contains it),
#      DMATX_EDU_MAX_TRANSFER (largest edu DMA; default: QEMU's edu buffer, 4095 before QEMU 10),
#      DMATX_VM_QEMU (default qemu-system-x86_64), DMATX_VM_APPEND (more kernel arguments).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
phase_start
require_linux_x86_64

QEMU="${DMATX_VM_QEMU:-qemu-system-x86_64}"
ACCEL="${DMATX_VM_ACCEL:-${ACCEL:-tcg}}"
SMP="${DMATX_VM_SMP:-2}"
MEM="${DMATX_VM_MEM:-512M}"
TIMEOUT="${DMATX_VM_TIMEOUT:-600}"
LOG="$WORK/serial.log"
for f in vmlinuz initramfs.cpio; do
    [ -f "$WORK/$f" ] || vm_die "no $WORK/$f: run vm/build.sh first"
done
command -v "$QEMU" >/dev/null || vm_die "$QEMU not found: run vm/setup.sh first"

APPEND="console=ttyS0 panic=-1 quiet loglevel=4 intel_iommu=on"
qemu_version=$("$QEMU" --version | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p')
if [ -n "${DMATX_EDU_MAX_TRANSFER:-}" ]; then
    APPEND="$APPEND dmatx.edu_max_transfer=$DMATX_EDU_MAX_TRANSFER"
elif [ "${qemu_version%%.*}" -lt 10 ] 2>/dev/null || [ -z "$qemu_version" ]; then
    vm_say "QEMU ${qemu_version:-of unknown version} is older than 10: its edu aborts on a DMA that ends at the end of its buffer; limiting edu transfers to 4095 bytes (dmatx.edu_max_transfer=4095)"
    APPEND="$APPEND dmatx.edu_max_transfer=4095"
fi
[ -z "${DMATX_VM_FILTER:-}" ] || APPEND="$APPEND dmatx.filter=$DMATX_VM_FILTER"
APPEND="$APPEND ${DMATX_VM_APPEND:-}"

case "$ACCEL" in
    tcg) CPU=max ;;
    kvm)
        [ -r /dev/kvm ] && [ -w /dev/kvm ] || vm_die "ACCEL=kvm but /dev/kvm is not accessible"
        CPU=host ;;
    *) vm_die "unknown accelerator '$ACCEL' (tcg or kvm)" ;;
esac

NVME_IMG=$(mktemp "$WORK/nvme.XXXXXX.img") # QEMU locks its image: one per run
trap 'rm -f "$NVME_IMG"' EXIT
truncate -s 16M "$NVME_IMG"

vm_say "booting: QEMU $qemu_version, $ACCEL, $SMP CPU(s), $MEM, timeout ${TIMEOUT}s; serial log $LOG"
phase_done prepare
set +e
timeout -k 10 "$TIMEOUT" "$QEMU" \
    -machine "q35,accel=$ACCEL,kernel-irqchip=split" -cpu "$CPU" -smp "$SMP" -m "$MEM" \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -device intel-iommu,intremap=on \
    -device edu \
    -drive "file=$NVME_IMG,if=none,id=nvme0,format=raw" \
    -device nvme,serial=dmatx0,drive=nvme0 \
    -kernel "$WORK/vmlinuz" -initrd "$WORK/initramfs.cpio" -append "$APPEND" \
    </dev/null 2>&1 | sed -u 's/\r$//' | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
phase_done boot
phases_report run

line=$(grep -aE '^dmatx-guest: [0-9]+ passed, [0-9]+ failed$' "$LOG" | tail -1 || true)
case "$rc" in
    0) ;;
    124 | 137) vm_say "QEMU killed after the ${TIMEOUT}s timeout (DMATX_VM_TIMEOUT); see $LOG" ;;
    *) vm_say "QEMU exited with status $rc; see $LOG" ;;
esac
if [[ "$line" =~ ^dmatx-guest:\ ([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
    passed=${BASH_REMATCH[1]} failed=${BASH_REMATCH[2]}
    if [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]; then
        vm_say "guest tests PASSED ($passed)"
        exit 0
    fi
    [ "$passed" -gt 0 ] || [ "$failed" -gt 0 ] ||
        vm_die "the guest ran no test (DMATX_VM_FILTER='${DMATX_VM_FILTER:-}' matches none?)"
    vm_die "guest tests FAILED: $passed passed, $failed failed (the \`test ... FAILED\` lines above say why)"
fi
vm_die "the guest printed no \`dmatx-guest: N passed, M failed\` line (see $LOG)"
