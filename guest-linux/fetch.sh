#!/usr/bin/env bash
# Fetch a stock Debian Linux kernel and build a busybox initramfs for a test guest.
#
#   guest-linux/fetch.sh [--flavour cloud|generic] [--no-vmlinux]
#
# Downloads (never installs) Debian's kernel package and busybox-static with
# apt-get download, extracts them with dpkg-deb -x, and builds an uncompressed
# cpio initramfs whose /init is guest-linux/init. Idempotent: everything is
# cached under $BHYVE_RS_CACHE (default: <repo>/.cache), a second run only
# prints the paths.
#
# stdout, one KEY=VALUE per line (eval-able), logs on stderr:
#   GUEST_KERNEL=…/vmlinuz           the bzImage
#   GUEST_VMLINUX=…/vmlinux          the ELF vmlinux (for PVH), decompressed from the bzImage
#   GUEST_INITRD=…/initramfs.cpio    the initramfs
#   GUEST_KERNEL_PACKAGE=NAME=VERSION, GUEST_BUSYBOX_PACKAGE=NAME=VERSION
#   GUEST_MARKER=BHYVE-RS-GUEST-MARKER   the line /init prints first
# Exit status: 0 ok, 2 usage, 11 download failed, 12 build failed.
set -euo pipefail

RIG_PROG=guest-linux/fetch.sh
export RIG_PROG
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../rig/lib/common.sh
. "$here/../rig/lib/common.sh"

flavour=cloud
want_vmlinux=1
while (($#)); do
    case $1 in
        --flavour) flavour=${2:?--flavour needs cloud or generic}; shift 2 ;;
        --no-vmlinux) want_vmlinux=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) rig_die "$RIG_EX_USAGE" usage "unknown argument '$1' (see --help)" ;;
    esac
done
case $flavour in
    cloud) meta=linux-image-cloud-amd64 ;;
    generic) meta=linux-image-amd64 ;;
    *) rig_die "$RIG_EX_USAGE" usage "--flavour must be cloud or generic" ;;
esac

for tool in apt-get apt-cache dpkg-deb cpio sha256sum; do
    command -v "$tool" >/dev/null || rig_die "$RIG_EX_DOWNLOAD" download "'$tool' is missing (a Debian host is needed; apt-get install cpio)"
done

cache=$(rig_cache_root)
kpkg=$(rig_deb_resolve_dep "$meta" linux-image-6)
kver=$(rig_deb_candidate "$kpkg")
kdir=$(rig_deb_fetch "$kpkg")
bver=$(rig_deb_candidate busybox-static)
bdir=$(rig_deb_fetch busybox-static)

kname=${kpkg#linux-image-}
vmlinuz=$kdir/boot/vmlinuz-$kname
[[ -f $vmlinuz ]] || rig_die "$RIG_EX_DOWNLOAD" download "$kpkg has no boot/vmlinuz-$kname"

key=$({ printf '%s\n' "$kpkg=$kver" "busybox-static=$bver"; cat "$here/init" "$here/../rig/lib/common.sh"; } | rig_hash)
out=$cache/guest-linux/$key
if [[ ! -f $out/.done ]]; then
    rig_log "building initramfs in $out"
    rm -rf "$out"
    mkdir -p "$out/root"
    root=$out/root
    rig_busybox_root "$bdir" "$root"
    install -m 0755 "$here/init" "$root/init"
    rig_cpio_tree "$root" "$out/tree.cpio"
    rig_cpio_devnodes "$out/dev.cpio"
    cat "$out/tree.cpio" "$out/dev.cpio" >"$out/initramfs.cpio"
    rm -rf "$root" "$out/tree.cpio" "$out/dev.cpio"
    cp "$vmlinuz" "$out/vmlinuz"
    touch "$out/.done"
fi
if [[ $want_vmlinux == 1 && ! -f $out/vmlinux ]]; then
    rig_log "decompressing the ELF vmlinux out of the bzImage"
    rig_extract_vmlinux "$out/vmlinuz" "$out/vmlinux"
fi
ln -sfn "$key" "$cache/guest-linux/current"
touch "$out"
# Older builds (another init, another kernel): keep the newest two.
find "$cache/guest-linux" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | tail -n +3 | cut -d' ' -f2- |
    while read -r old; do rm -rf "$old"; done

printf 'GUEST_KERNEL=%s\n' "$out/vmlinuz"
if [[ -f $out/vmlinux ]]; then printf 'GUEST_VMLINUX=%s\n' "$out/vmlinux"; fi
printf 'GUEST_INITRD=%s\n' "$out/initramfs.cpio"
printf 'GUEST_KERNEL_PACKAGE=%s\n' "$kpkg=$kver"
printf 'GUEST_BUSYBOX_PACKAGE=%s\n' "busybox-static=$bver"
printf 'GUEST_MARKER=%s\n' BHYVE-RS-GUEST-MARKER
