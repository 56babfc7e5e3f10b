#!/usr/bin/env bash
# dmatx's guest tier in one command (what `cargo xtask vm` runs): setup.sh (packages and the
# kernel), build.sh (the static harness and the initramfs), run.sh (one boot, all guest tests).
# Exit 0 passed, 1 failed, 77 cannot run on this machine (reason on the `vm: SKIP:` line).
# The environment settings of each script apply (see vm/README.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
phase_start
for step in setup build run; do
    echo "vm: ---- $step.sh ----"
    rc=0
    "$VM_DIR/$step.sh" || rc=$?
    phase_done "$step"
    if [ "$rc" -ne 0 ]; then
        phases_report run-all
        [ "$rc" -eq "$VM_SKIP" ] && exit "$VM_SKIP"
        vm_die "$step.sh failed (exit status $rc)"
    fi
done
phases_report run-all
