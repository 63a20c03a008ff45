# shellcheck shell=sh
# Payload for `rig/run.sh --compare PATH`, run by busybox sh inside the outer VM (L1):
# the same guest kernel and initramfs, quiet, 1 vCPU, 256 MiB, under our bhyve and
# under QEMU with KVM (-M pc, -M microvm), side by side in the same outer VM.
# RIG_MACHINES lists the VMMs, in order: bhyve, bhyve-pvh (ours booting the ELF vmlinux
# through PVH), pc, microvm, or a variant NAME (another build of ours, /payload/bhyve-variant-NAME).
#
#   0. one warm-up run each (NAME.warmup.*, not in the summaries)
#   1. RIG_RUNS timed rounds, interleaved (bhyve, pc, microvm, bhyve, pc, ...):
#      start_to_marker_s, total_s (results NAME.runI.*; min/avg/max in NAME.start_to_marker_s)
#   2. one counted run each: every exit KVM took (kvm_exit), exits to userspace
#      (kvm_userspace_exit), per port (kvm_pio), per MMIO address (kvm_mmio), per MSR
#      (kvm_msr); ours also with -o stats.print=true -o stats.histograms=true
#   3. with RIG_PROFILE=1, one timeline run each (every KVM event in L1's trace buffer:
#      when the VM is created, first entered, first exits at a kernel-half RIP, reaches the
#      marker; time in the guest, in KVM, in the VMM by port/address: rig_timeline_stop),
#      and one profile run each with initcall_debug: the guest prints its
#      initcalls of 1 ms or more and its whole kernel log (BHYVE-RS-INITCALL/-TIMELINE);
#      ours also with -o trace.file, summarised here (exits per owner, time in the
#      handler, exits per second of the run)
# A run that fails (marker missing, timeout, wrong exit status) is a failure of the payload;
# the figures of the other runs are still reported.
# Settings come from /payload/rig.conf (written by rig/run.sh).
# shellcheck source-path=SCRIPTDIR source=../l1/harness.sh
. /rig/harness.sh
# shellcheck disable=SC1091 # written by rig/run.sh
. /payload/rig.conf

kernel=/payload/guest/vmlinuz
vmlinux=/payload/guest/vmlinux
initrd=/payload/guest/initramfs.cpio
base="console=ttyS0 panic=-1 quiet"
extra=${RIG_GUEST_APPEND:+ $RIG_GUEST_APPEND}
socks=/tmp/bhyve-sockets
mkdir -p "$socks"
rig_result compare.guest_cmdline "$base bhyvers.test=poweroff$extra"
rig_result compare.qemu_version "$(/usr/bin/qemu-system-x86_64 --version | head -n1 | tr ' ' '_')"

# vmm NAME KIND CMDLINE [BHYVE-OPTIONS...]: one run of one VMM (KIND bhyve, pc or microvm).
vmm() {
    name=$1 kind=$2 cmdline=$3
    shift 3
    case $kind in
    bhyve | bhyve-pvh)
        if [ "$kind" = bhyve ]; then kopts="-o boot.kernel=$kernel"; else kopts="-o boot.kernel=$vmlinux -o boot.protocol=pvh"; fi
        # shellcheck disable=SC2086 # $kopts is a list of options
        rig_guest_run "$name" "$RIG_GUEST_TIMEOUT" 1 /payload/bhyve -c 1 -m 256M -l com1,stdio \
            $kopts -o "boot.initrd=$initrd" -o "boot.cmdline=$cmdline" \
            -o "vmm.socket_dir=$socks" "$@" rig-cmp
        ;;
    pc | microvm)
        if [ "$kind" = pc ]; then mopts="-M pc -vga none -nic none"; else mopts="-M microvm"; fi
        # shellcheck disable=SC2086 # $mopts is a list of options
        rig_guest_run "$name" "$RIG_GUEST_TIMEOUT" 0 /usr/bin/qemu-system-x86_64 $mopts \
            -enable-kvm -cpu host -smp 1 -m 256M -nodefaults -no-user-config -display none \
            -serial stdio -monitor none -no-reboot -kernel "$kernel" -initrd "$initrd" -append "$cmdline"
        ;;
    *)
        [ -x "/payload/bhyve-variant-$kind" ] || { rig_fail usage 2 "$name: no VMM named $kind"; return 0; }
        rig_guest_run "$name" "$RIG_GUEST_TIMEOUT" 1 "/payload/bhyve-variant-$kind" -c 1 -m 256M -l com1,stdio \
            -o "boot.kernel=$kernel" -o "boot.initrd=$initrd" -o "boot.cmdline=$cmdline" \
            -o "vmm.socket_dir=$socks" "$@" rig-cmp
        ;;
    esac
}

kinds=$RIG_MACHINES
# One discarded run of each first: the first inner VM after L1's boot finds L1's memory
# fresh (see rig/README.md), the others do not.
for k in $kinds; do
    vmm "$k.warmup" "$k" "$base bhyvers.test=poweroff$extra"
done
i=1
while [ "$i" -le "$RIG_RUNS" ]; do
    for k in $kinds; do
        vmm "$k.run$i" "$k" "$base bhyvers.test=poweroff$extra"
    done
    i=$((i + 1))
done
for k in $kinds; do
    rig_summary "^${k}[.]run[0-9]+[.]start_to_marker_s\$" "$k.start_to_marker_s"
    rig_summary "^${k}[.]run[0-9]+[.]total_s\$" "$k.total_s"
done

# Our exit counters as results: "description:value,..." from -o stats.print=true.
bhyve_stats() { # NAME
    [ -f "/tmp/$1.console" ] || return 0
    rig_result "$1.bhyve_stats" "$(awk '/^vcpu[0-9]+:$/ { on = 1; next }
        on && /^  / { v = $NF; $NF = ""; sub(/^ +/, ""); sub(/ +$/, ""); gsub(/ /, "_"); s = s (s == "" ? "" : ",") $0 ":" v }
        END { print (s == "" ? "-" : s) }' "/tmp/$1.console")"
}

if [ "$RIG_COUNT_EXITS" = 1 ]; then
    for k in $kinds; do
        rig_exits_start || echo "RIG-NOTE exit counting unavailable (no kvm hist triggers)"
        if [ "$k" != pc ] && [ "$k" != microvm ]; then
            vmm "$k.counted" "$k" "$base bhyvers.test=poweroff$extra" -o stats.print=true -o stats.histograms=true
            bhyve_stats "$k.counted"
        else
            vmm "$k.counted" "$k" "$base bhyvers.test=poweroff$extra"
        fi
        rig_exits_stop "$k.counted"
    done
fi

# Summary of our Chrome trace: per "kind owner" name: exits, sum of dur (ms), and the
# exits per second of the run.
trace_summary() { # NAME FILE
    [ -s "$2" ] || { rig_result "$1.trace" missing; return 0; }
    tr '{' '\n' <"$2" | awk -v name="$1" '
        /"ph":"X"/ {
            n = $0; sub(/^"name":"/, "", n); sub(/".*/, "", n)
            ts = $0; sub(/.*"ts":/, "", ts); sub(/,.*/, "", ts)
            d = $0; sub(/.*"dur":/, "", d); sub(/,.*/, "", d)
            cnt[n]++; dur[n] += d; total++
            if (first == "" || ts + 0 < first) first = ts + 0
            sec = int(ts / 1e6); per[sec]++; if (sec > last) last = sec
            if (min0 == "" || sec < min0) min0 = sec
        }
        END {
            s = ""
            for (k in cnt) s = s (s == "" ? "" : ",") k ":" cnt[k] ":" sprintf("%.1fms", dur[k] / 1000)
            gsub(/ /, "_", s)
            print name ".trace_exits=" total
            print name ".trace_by_owner=" s
            r = ""
            for (x = min0; x <= last; x++) r = r (r == "" ? "" : ",") (x - min0) "s:" (per[x] + 0)
            print name ".trace_exits_per_second=" r
        }' >/tmp/trace-results
    while IFS="=" read -r key value; do rig_result "$key" "$value"; done </tmp/trace-results
    rm -f /tmp/trace-results
}

if [ "${RIG_PROFILE:-0}" = 1 ]; then
    for k in $kinds; do
        rig_timeline_start || echo "RIG-NOTE timeline unavailable (no tracefs)"
        vmm "$k.timeline" "$k" "$base bhyvers.test=poweroff$extra"
        rig_timeline_stop "$k.timeline"
    done
    prof="$base initcall_debug log_buf_len=4M bhyvers.test=initcalls,poweroff$extra"
    for k in $kinds; do
        if [ "$k" != pc ] && [ "$k" != microvm ]; then
            vmm "$k.profile" "$k" "$prof" -o trace.file=/tmp/bhyve-trace.json
            trace_summary "$k.profile" /tmp/bhyve-trace.json
            rm -f /tmp/bhyve-trace.json
        else
            vmm "$k.profile" "$k" "$prof"
        fi
        if [ -f "/tmp/$k.profile.console" ]; then
            rig_result "$k.profile.initcalls" "$(sed -n 's/^BHYVE-RS-INITCALL //p' "/tmp/$k.profile.console" | tr -d '\r' | head -n 25 | awk '{ s = s (s == "" ? "" : ",") $2 ":" $1 } END { print s }')"
            # milestones only (the whole log is in the console file)
            rig_result "$k.profile.timeline" "$(sed -n 's/^BHYVE-RS-TIMELINE //p' "/tmp/$k.profile.console" | tr -d '\r' |
                grep -E 'kvm-clock: using sched offset|Console: colour|Calibrating delay|APIC calibration|smp: Brought up|Switched to clocksource|Trying to unpack rootfs|Serial: 8250|i8042|rtc_cmos .* setting system clock|Run .* as init process' |
                awk '{ t = $1; $1 = ""; sub(/^ /, ""); gsub(/[ ,=]/, "_"); s = s (s == "" ? "" : ",") t ":" substr($0, 1, 48) } END { print s }')"
        fi
    done
fi
exit "$RIG_STATUS"
