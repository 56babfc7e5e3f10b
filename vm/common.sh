# Shared by the vm/*.sh scripts (sourced, not run): paths, settings, messages, timings.
#
# Exit codes of every vm script: 0 done, 1 failed, 77 cannot run on this machine (the last
# `vm: SKIP: <reason>` line on standard output says why; `cargo xtask vm` records a skip).

VM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$VM_DIR/.." && pwd)"
WORK="${DMATX_VM_WORK:-$REPO/target/vm}"
VM_SKIP=77

vm_say() { echo "vm: $*"; }
vm_skip() { echo "vm: SKIP: $*"; exit "$VM_SKIP"; }
vm_die() { echo "vm: ERROR: $*"; exit 1; }

# Phase timings: `phase_start`, then `phase_done <name>` after each phase; `phases_report
# <script>` prints them all on one line.
PHASES=()
phase_start() { PHASE_T0=$EPOCHREALTIME; SCRIPT_T0=${SCRIPT_T0:-$EPOCHREALTIME}; }
phase_done() {
    local now=$EPOCHREALTIME
    PHASES+=("$1 $(awk -v a="$PHASE_T0" -v b="$now" 'BEGIN{printf "%.1fs", b-a}')")
    PHASE_T0=$now
}
phases_report() {
    local line="" p
    for p in "${PHASES[@]}"; do line+="$p, "; done
    echo "vm: $1 timings: ${line}total $(awk -v a="$SCRIPT_T0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1fs", b-a}')"
}

# Whether the ELF file $1 is statically linked (no program interpreter), by `ldd`.
is_static() {
    local out
    out=$(LC_ALL=C ldd "$1" 2>&1 || true)
    [[ "$out" == *"not a dynamic executable"* || "$out" == *"statically linked"* ]]
}

# The host must be Linux on x86_64: the guest is an x86_64 QEMU machine and the build is for
# x86_64-unknown-linux-gnu.
require_linux_x86_64() {
    local os arch
    os=$(uname -s) arch=$(uname -m)
    [ "$os" = Linux ] && [ "$arch" = x86_64 ] ||
        vm_skip "the guest tier needs a Linux x86_64 host (this is $os $arch)"
}
