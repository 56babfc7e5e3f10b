#!/bin/busybox sh
# PID 1 of dmatx's test guest (copied to /init of the initramfs by vm/build.sh):
# mounts /proc /sys /dev, loads the VFIO modules listed in /lib/modules/order, binds every
# QEMU edu (1234:11e8) and nvme (1b36:0010) device to vfio-pci, runs /bin/dmatx-guest once
# with all its tests, and powers off. Every module or bind failure is printed and counted; the
# count reaches the harness as DMATX_INIT_ERRORS (its env.init_setup test fails on non-zero).
#
# Kernel command line settings: dmatx.filter=<test name part>, dmatx.edu_max_transfer=<bytes>
# (exported as DMATX_EDU_MAX_TRANSFER), dmatx.test_timeout=<seconds>
# (DMATX_GUEST_TEST_TIMEOUT).
#
# No `set -e` here: PID 1 exiting panics the kernel and loses the report; each step checks.
set -u
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo "init: started at uptime $(uptime_s)s"
errors=0
fail() { echo "init: ERROR: $*"; errors=$((errors + 1)); }

# The value of dmatx.<name>= on the kernel command line, or nothing.
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in dmatx.$1=*) echo "${w#*=}"; return ;; esac
    done
}

# --- modules ------------------------------------------------------------------------------------
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done
[ -d /sys/bus/pci/drivers/vfio-pci ] || fail "no vfio-pci driver after loading the modules"

# --- devices --------------------------------------------------------------------------------------
# driver_override makes only vfio-pci match; unbind from a built-in driver (the cloud kernel's
# nvme), then let the PCI core probe again.
bind_vfio() {
    d=/sys/bus/pci/devices/$1
    echo vfio-pci > "$d/driver_override" || { fail "$1: cannot set driver_override"; return; }
    if [ -e "$d/driver" ]; then
        echo "$1" > "$d/driver/unbind" || { fail "$1: cannot unbind from its driver"; return; }
    fi
    echo "$1" > /sys/bus/pci/drivers_probe
    driver=$(basename "$(readlink "$d/driver")" 2>/dev/null)
    group=$(basename "$(readlink "$d/iommu_group")" 2>/dev/null)
    if [ "$driver" = vfio-pci ] && [ -n "$group" ] && [ -c "/dev/vfio/$group" ]; then
        echo "init: $1 ($2) bound to vfio-pci, IOMMU group $group"
    else
        fail "$1 ($2) not bound: driver '${driver:-none}', IOMMU group '${group:-none}'"
    fi
}
found=0
for d in /sys/bus/pci/devices/*; do
    id="$(cat "$d/vendor"):$(cat "$d/device")"
    case "$id" in
        0x1234:0x11e8) found=$((found + 1)); bind_vfio "${d##*/}" edu ;;
        0x1b36:0x0010) found=$((found + 1)); bind_vfio "${d##*/}" nvme ;;
    esac
done
[ "$found" -gt 0 ] || fail "no edu or nvme device on the PCI bus"
echo "init: /dev/vfio: $(ls /dev/vfio 2>/dev/null | tr '\n' ' ')"
echo "init: $found device(s), $errors error(s), ready at uptime $(uptime_s)s"

# --- tests ------------------------------------------------------------------------------------
export DMATX_INIT_ERRORS=$errors
v=$(arg edu_max_transfer); [ -z "$v" ] || export DMATX_EDU_MAX_TRANSFER="$v"
v=$(arg test_timeout); [ -z "$v" ] || export DMATX_GUEST_TEST_TIMEOUT="$v"
filter=$(arg filter)
# shellcheck disable=SC2086 # an empty filter is no argument
/bin/dmatx-guest $filter
echo "init: dmatx-guest exited with status $? at uptime $(uptime_s)s"
poweroff -f
