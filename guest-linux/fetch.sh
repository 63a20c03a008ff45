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
#   GUEST_INITRD_VIRTIO=…/initramfs-virtio.cpio
#                                    the same plus the kernel's virtio modules (virtio_pci,
#                                    virtio_blk, virtio_net and what they need, and ext4
#                                    where it is a module: the generic kernel), loaded by
#                                    /init's "modules"
#   GUEST_ROOTFS_TREE=…/rootfs       a root file system tree (static busybox, /sbin/init = the
#                                    same guest-linux/init) for "mke2fs -t ext4 -d TREE IMAGE"
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

PATH=$PATH:/usr/sbin:/sbin
command -v depmod >/dev/null || rig_die "$RIG_EX_DOWNLOAD" download "'depmod' is missing (apt-get install kmod): the virtio modules' load order comes from modules.dep"
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

# The virtio drivers /init's "modules" action loads (GUEST_INITRD_VIRTIO), with what they
# need, in load order.
# ext4 only where it is a module (the generic kernel; the cloud kernel has it built in), with
# crc32c (a crypto soft dependency modules.dep does not list: metadata_csum needs it).
moddir=$kdir/lib/modules/$kname
virtio_modules=(kernel/drivers/virtio/virtio_pci.ko kernel/drivers/block/virtio_blk.ko kernel/drivers/net/virtio_net.ko)
modorder=$(rig_module_order "$moddir" "${virtio_modules[@]}") || exit $?
if grep -q '^kernel/fs/ext4/ext4.ko:' "$moddir/modules.dep"; then
    modorder=$(rig_module_order "$moddir" "${virtio_modules[@]}" kernel/crypto/crc32c_generic.ko kernel/fs/ext4/ext4.ko) || exit $?
fi

key=$({ printf '%s\n' "$kpkg=$kver" "busybox-static=$bver" "$modorder"; cat "$here/init" "$here/../rig/lib/common.sh"; } | rig_hash)
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
    # The virtio drivers as one more archive (the kernel unpacks concatenated archives):
    # /lib/modules/bhyvers/NAME.ko and /lib/modules/bhyvers/order (file names, load order).
    # The cloud kernel's modules are not compressed (CONFIG_MODULE_COMPRESS_NONE): busybox
    # insmod takes them as they are.
    mods=$out/modules
    mkdir -p "$mods/lib/modules/bhyvers"
    while read -r m; do
        cp "$moddir/$m" "$mods/lib/modules/bhyvers/"
        basename "$m" >>"$mods/lib/modules/bhyvers/order"
    done <<<"$modorder"
    rig_cpio_tree "$mods" "$out/modules.cpio"
    cat "$out/initramfs.cpio" "$out/modules.cpio" >"$out/initramfs-virtio.cpio"
    # A root file system tree: the same busybox and init, as /sbin/init.
    rm -f "$root/init" "$root/sbin/init"
    install -m 0755 "$here/init" "$root/sbin/init"
    mkdir -p "$root/bhyvers" "$root/mnt"
    mv "$root" "$out/rootfs"
    rm -rf "$mods" "$out/tree.cpio" "$out/dev.cpio" "$out/modules.cpio"
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
printf 'GUEST_INITRD_VIRTIO=%s\n' "$out/initramfs-virtio.cpio"
printf 'GUEST_ROOTFS_TREE=%s\n' "$out/rootfs"
printf 'GUEST_KERNEL_PACKAGE=%s\n' "$kpkg=$kver"
printf 'GUEST_BUSYBOX_PACKAGE=%s\n' "busybox-static=$bver"
printf 'GUEST_MARKER=%s\n' BHYVE-RS-GUEST-MARKER
