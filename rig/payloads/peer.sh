# shellcheck shell=sh
# Payload for `rig/run.sh --peer`, run by busybox sh inside the outer VM (L1).
# Boots the guest from guest-linux/fetch.sh under QEMU with KVM (kvm_amd), with
# -M pc and -M microvm, RIG_RUNS timed runs each and one more run that counts
# exits. Settings come from /payload/rig.conf (written by rig/run.sh).
# shellcheck source-path=SCRIPTDIR source=../l1/harness.sh
. /rig/harness.sh
# shellcheck disable=SC1091 # written by rig/run.sh
. /payload/rig.conf

kernel=/payload/guest/vmlinuz
initrd=/payload/guest/initramfs.cpio
append="console=ttyS0 panic=-1 quiet bhyvers.test=poweroff${RIG_GUEST_APPEND:+ $RIG_GUEST_APPEND}"
rig_result peer.guest_cmdline "$append"
rig_result peer.qemu_version "$(/usr/bin/qemu-system-x86_64 --version | head -n1 | tr ' ' '_')"

for machine in $RIG_MACHINES; do
    case $machine in
    pc) mopts="-M pc -vga none -nic none" ;;
    microvm) mopts="-M microvm" ;;
    *) mopts="-M $machine" ;;
    esac
    label=$(echo "qemu_$machine" | tr -c 'A-Za-z0-9_\n' _)
    i=1
    while [ "$i" -le "$RIG_RUNS" ]; do
        # shellcheck disable=SC2086 # $mopts is a list of options
        rig_guest_run "$label.run$i" "$RIG_GUEST_TIMEOUT" 0 \
            /usr/bin/qemu-system-x86_64 $mopts -enable-kvm -cpu host -smp 1 -m 256M \
            -nodefaults -no-user-config -display none -serial stdio -monitor none -no-reboot \
            -kernel "$kernel" -initrd "$initrd" -append "$append"
        i=$((i + 1))
    done
    rig_summary "^${label}[.]run[0-9]+[.]start_to_marker_s\$" "$label.start_to_marker_s"
    rig_summary "^${label}[.]run[0-9]+[.]total_s\$" "$label.total_s"
    if [ "$RIG_COUNT_EXITS" = 1 ]; then
        rig_exits_start || echo "RIG-NOTE exit counting unavailable (no kvm hist triggers)"
        # shellcheck disable=SC2086
        rig_guest_run "$label.counted" "$RIG_GUEST_TIMEOUT" 0 \
            /usr/bin/qemu-system-x86_64 $mopts -enable-kvm -cpu host -smp 1 -m 256M \
            -nodefaults -no-user-config -display none -serial stdio -monitor none -no-reboot \
            -kernel "$kernel" -initrd "$initrd" -append "$append"
        rig_exits_stop "$label.counted"
    fi
done
exit "$RIG_STATUS"
