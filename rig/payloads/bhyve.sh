# shellcheck shell=sh
# Payload for `rig/run.sh --bhyve PATH`, run by busybox sh inside the outer VM
# (L1). Our bhyve (copied to /payload/bhyve) boots the guest from
# guest-linux/fetch.sh on L1's kvm_amd: 1 and 2 vCPUs, each with a quiet and a
# full serial console, expecting exit status 1 (poweroff) and the guest to see
# the vCPUs it was given; then one guest reboot, expecting exit status 0.
# Settings come from /payload/rig.conf (written by rig/run.sh).
# shellcheck source-path=SCRIPTDIR source=../l1/harness.sh
. /rig/harness.sh
# shellcheck disable=SC1091 # written by rig/run.sh
. /payload/rig.conf

kernel=/payload/guest/vmlinuz
initrd=/payload/guest/initramfs.cpio
extra=${RIG_GUEST_APPEND:+ $RIG_GUEST_APPEND}

exit_name() { # bhyve(8) exit statuses
    case $1 in
    0) echo reboot ;; 1) echo poweroff ;; 2) echo halt ;; 3) echo triple-fault ;; 4) echo error ;;
    *) echo "other-$1" ;;
    esac
}

run_bhyve() { # NAME CPUS EXPECT CMDLINE
    rig_guest_run "$1" "$RIG_GUEST_TIMEOUT" "$3" /payload/bhyve -c "$2" -m 256M -l com1,stdio \
        -o "boot.kernel=$kernel" -o "boot.initrd=$initrd" -o "boot.cmdline=$4" "rig-$2"
    ret=$?
    rig_result "$1.exit" "$(exit_name "$(sed -n "s/^$1[.]vmm_status=//p" "$RIG_RESULTS" | tail -n 1)")"
    if [ -f "/tmp/$1.console" ] && grep -q "^$RIG_MARKER" "/tmp/$1.console"; then
        seen=$(sed -n 's/^BHYVE-RS-INFO cpus=//p' "/tmp/$1.console" | tr -d '\r')
        rig_result "$1.guest_cpus" "${seen:-unknown}"
        if [ "$ret" = 0 ] && [ -n "$seen" ] && [ "$seen" != "$2" ]; then
            rig_fail guest-cpus 1 "$1: the guest saw $seen vCPUs, bhyve was given $2"
        fi
    fi
}

for cpus in 1 2; do
    run_bhyve "bhyve_c$cpus.quiet" "$cpus" 1 "console=ttyS0 panic=-1 quiet bhyvers.test=info,poweroff$extra"
    run_bhyve "bhyve_c$cpus.verbose" "$cpus" 1 "console=ttyS0 panic=-1 bhyvers.test=info,poweroff$extra"
done
run_bhyve "bhyve_c1.reboot" 1 0 "console=ttyS0 panic=-1 quiet bhyvers.test=info,reboot$extra"
rig_summary "^bhyve_c[0-9][.]quiet[.]start_to_marker_s\$" "bhyve.quiet_start_to_marker_s"
exit "$RIG_STATUS"
