#!/bin/sh
# A stand-in for our bhyve, to test the rig's --bhyve payload before the monitor
# boots Linux: it accepts the bhyve(8) options the payload uses, boots the guest
# under QEMU with KVM inside L1 (run.sh --bhyve ... --with-qemu), and maps what
# the guest said it did onto bhyve's exit statuses (0 reboot, 1 poweroff, 2 halt,
# 4 error). Never a replacement for the monitor: a rig self-test.
cpus=1 mem=256M kernel='' initrd='' cmdline=''
devs='' # -s virtio-blk,PATH / virtio-net,TAP as QEMU's virtio-pci devices
while [ $# -gt 1 ]; do
    case $1 in
    -c) cpus=$2; shift 2 ;;
    -m) mem=$2; shift 2 ;;
    -l) shift 2 ;;
    -s)
        case ${2#*,} in
        virtio-blk,*) devs="$devs -drive file=${2#*,virtio-blk,},format=raw,if=virtio" ;;
        virtio-net,*) devs="$devs -netdev tap,id=n${2%%,*},ifname=${2#*,virtio-net,},script=no,downscript=no -device virtio-net-pci,romfile=,netdev=n${2%%,*}" ;;
        *) echo "fake-bhyve: unsupported -s $2" >&2; exit 4 ;;
        esac
        shift 2
        ;;
    -o)
        case $2 in
        boot.kernel=*) kernel=${2#boot.kernel=} ;;
        boot.initrd=*) initrd=${2#boot.initrd=} ;;
        boot.cmdline=*) cmdline=${2#boot.cmdline=} ;;
        esac
        shift 2
        ;;
    *) echo "fake-bhyve: unknown option $1" >&2; exit 4 ;;
    esac
done
[ -x /usr/bin/qemu-system-x86_64 ] || { echo "fake-bhyve: needs QEMU in L1 (--with-qemu)" >&2; exit 4; }
# shellcheck disable=SC2086 # $devs is a list of options
/usr/bin/qemu-system-x86_64 -M pc -vga none -nic none -enable-kvm -cpu host -smp "$cpus" -m "$mem" \
    -nodefaults -no-user-config -display none -serial stdio -monitor none -no-reboot $devs \
    -kernel "$kernel" -initrd "$initrd" -append "$cmdline" </dev/null | tee /tmp/fake-bhyve.out
case $(tr -d '\r' </tmp/fake-bhyve.out | sed -n 's/^BHYVE-RS-GUEST-DONE //p' | tail -n 1) in
reboot) exit 0 ;;
poweroff) exit 1 ;;
halt) exit 2 ;;
*) exit 4 ;;
esac
