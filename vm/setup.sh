#!/usr/bin/env bash
# Makes the host ready for dmatx's guest tier:
#   - QEMU (qemu-system-x86 from bookworm-backports on Debian 12, adding that apt source under
#     /etc/apt/sources.list.d/dmatx-bookworm-backports.sources if missing), busybox-static,
#     cpio: installed with apt-get only if missing (needs root or password-less sudo);
#   - the Debian cloud kernel: the package behind linux-image-cloud-amd64 is resolved now,
#     downloaded and extracted (not installed) into $WORK/kernel-<package>/.
# Writes $WORK/kernel-current (the package name). Env: DMATX_VM_WORK (default target/vm),
# DMATX_VM_KFLAVOUR (default cloud-amd64). Exit 0 ready, 1 failed, 77 cannot run here.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
phase_start
require_linux_x86_64
mkdir -p "$WORK"

KFLAVOUR="${DMATX_VM_KFLAVOUR:-cloud-amd64}"
BACKPORTS_SOURCE=/etc/apt/sources.list.d/dmatx-bookworm-backports.sources

if [ "$(id -u)" = 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    SUDO=(none)
fi
as_root() {
    if [ "${SUDO[0]:-}" = none ]; then return 1; fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive "$@"
}
codename() { (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}"); }
have_backports_source() {
    grep -qs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources
}
add_backports_source() {
    have_backports_source && return 0
    vm_say "adding the bookworm-backports apt source: $BACKPORTS_SOURCE"
    as_root tee "$BACKPORTS_SOURCE" >/dev/null <<'SRC'
# Added by dmatx's vm/setup.sh: QEMU 10 for the guest tier (older QEMU's edu device aborts on
# a DMA that ends at the end of its buffer).
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    APT_UPDATED=0
}
APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" = 1 ] && return 0
    vm_say "apt-get update"
    if ! as_root apt-get update -qq; then
        vm_skip "apt-get update failed (offline or no apt mirror?)"
    fi
    APT_UPDATED=1
}

# --- packages -----------------------------------------------------------------------------
busybox_static() { [ -x /bin/busybox ] && is_static /bin/busybox; }
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
busybox_static || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)

if [ ${#missing[@]} -gt 0 ]; then
    vm_say "missing: ${missing[*]}"
    command -v apt-get >/dev/null ||
        vm_skip "missing ${missing[*]} and there is no apt-get to install them"
    [ "${SUDO[0]:-}" != none ] ||
        vm_skip "missing ${missing[*]}; installing needs root (or password-less sudo): apt-get install ${missing[*]}"
    suite=()
    if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] && [ "$(codename)" = bookworm ]; then
        # QEMU 10 from backports: bookworm's 7.2 has the edu erratum, and installing it would
        # remove a backports qemu-utils.
        suite=(-t bookworm-backports)
    fi
    [ ${#suite[@]} -eq 0 ] || add_backports_source
    apt_update
    vm_say "apt-get install ${suite[*]:+${suite[*]} }${missing[*]}"
    if ! as_root apt-get install -y -qq --no-install-recommends "${suite[@]}" "${missing[@]}" >/dev/null; then
        vm_skip "apt-get install ${suite[*]:+${suite[*]} }${missing[*]} failed (offline?)"
    fi
fi
if [ "$(codename)" = bookworm ] && [ "${SUDO[0]:-}" != none ] &&
    dpkg-query -W -f '${Version}' qemu-system-x86 2>/dev/null | grep -q bpo; then
    # QEMU came from backports: keep its source, or it never gets updates.
    add_backports_source
fi
qemu_version=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9.]*\).*/\1/p')
vm_say "QEMU $qemu_version, busybox $(/bin/busybox | sed -n '1s/^BusyBox \(v[^ ]*\).*/\1/p')"
phase_done packages

# --- kernel ---------------------------------------------------------------------------------
cached=$(cat "$WORK/kernel-current" 2>/dev/null || true)
KPKG=""
if command -v apt-cache >/dev/null; then
    KPKG=$(apt-cache depends "linux-image-$KFLAVOUR" 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/{print $2; exit}' || true)
fi
if [ -z "$KPKG" ] && [ -n "$cached" ] && [ -d "$WORK/kernel-$cached" ]; then
    vm_say "cannot resolve linux-image-$KFLAVOUR now; using the cached $cached"
    KPKG=$cached
fi
[ -n "$KPKG" ] ||
    vm_skip "cannot resolve the kernel package behind linux-image-$KFLAVOUR (no apt, or apt lists missing: apt-get update)"

KDIR="$WORK/kernel-$KPKG"
if [ ! -d "$KDIR" ]; then
    command -v dpkg-deb >/dev/null || vm_skip "no dpkg-deb to extract the kernel package $KPKG"
    dl="$WORK/download"
    rm -rf "$dl" && mkdir -p "$dl"
    vm_say "downloading $KPKG"
    if ! (cd "$dl" && apt-get download -q "$KPKG" >/dev/null 2>&1); then
        # The lists may name a version the mirror no longer has: refresh once, retry.
        if [ "${SUDO[0]:-}" != none ] && as_root apt-get update -qq; then
            (cd "$dl" && apt-get download -q "$KPKG" >/dev/null 2>&1) || true
        fi
    fi
    deb=$(ls "$dl"/"$KPKG"_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
        if [ -n "$cached" ] && [ -d "$WORK/kernel-$cached" ]; then
            vm_say "cannot download $KPKG; using the cached $cached"
            KPKG=$cached KDIR="$WORK/kernel-$cached"
        else
            vm_skip "the kernel package $KPKG cannot be downloaded (apt-get download $KPKG failed: offline?)"
        fi
    else
        rm -rf "$KDIR.tmp"
        dpkg-deb -x "$deb" "$KDIR.tmp"
        mv "$KDIR.tmp" "$KDIR"
        rm -rf "$dl"
        vm_say "extracted $(basename "$deb") ($(du -sh "$KDIR" | cut -f1))"
    fi
fi
echo "$KPKG" > "$WORK/kernel-current"
# Only the current kernel stays cached.
for old in "$WORK"/kernel-linux-image-*; do
    [ "$old" = "$KDIR" ] || { [ -d "$old" ] && rm -rf "$old" && vm_say "removed old $(basename "$old")"; }
done
vm_say "kernel: $KPKG"
phase_done kernel
phases_report setup
