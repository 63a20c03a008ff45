# shellcheck shell=sh
# Payload for `rig/run.sh --bhyve PATH`, run by busybox sh inside the outer VM (L1).
# Our bhyve (copied to /payload/bhyve) boots the guest from guest-linux/fetch.sh on L1's
# kvm_amd; every check below is a RIG-RESULT and, if wrong, a RIG-FAIL:
#
#   bhyve_cN.quiet      -c N (1, 2), quiet, bhyvers.test=info,dmesg,poweroff: exit 1
#                       (poweroff), the marker, the guest sees N vCPUs, and its own dmesg
#                       shows our platform (dmesg_check) with no unexpected warning
#   bhyve_cN.verbose    the same with a full serial console (info,poweroff): exit 1, the
#                       kernel's own "Preparing to enter system sleep state S5" on the console
#   bhyve_c1.reboot     bhyvers.test=info,reboot: exit 0
#   bhyve_c1.pvh        the ELF vmlinux through PVH (-o boot.protocol=pvh), quiet,
#                       info,dmesg,poweroff: as bhyve_c1.quiet
#   hostile_*           a truncated bzImage (half of it; and only its first 600 bytes), a
#                       file that is not a kernel (64 KiB of random bytes), an initramfs
#                       larger than guest memory (100 MiB made here with dd, -m 128M: with
#                       -m 64M the kernel alone does not fit): exit 4 (error) and a message
#                       on stderr that says why (HOSTILE.message)
#   bhyve_c1.rootfs     root file system on virtio-blk: L1's /dev/vda (the ext4 image
#                       rig/run.sh made with mke2fs -d and gave L1 as a disk) is our
#                       -s 4,virtio-blk,/dev/vda; the guest (initramfs with the virtio
#                       modules) loads them, mounts root=/dev/vda rw, switch_roots into it,
#                       reads the host's seed file, writes /bhyvers/written.txt (with a nonce
#                       made here) and 1 MiB of random bytes, syncs, powers off (exit 1).
#                       Checked here: modules loaded, ext4 mounted rw, the write reported; on
#                       the host after L1 stops (rig/run.sh): the bytes in the image
#   bhyve_c1.net        virtio-net on a tap: L1 makes tap rigtap0 (10.77.0.1/24) and
#                       -s 5,virtio-net,rigtap0; the guest (10.77.0.2) pings L1 (3 pings, 2
#                       full-frame ones: every reply wanted), L1 pings the guest once it hears
#                       from it (3: every reply wanted), the guest waits for those 3
#   l1.dmesg            L1's own kernel log after all runs: no WARNING/BUG/Call Trace (our
#                       ioctls must not trip kvm_amd)
# RIG_CASES (rig/run.sh --cases) selects among c1.quiet c1.verbose c2.quiet c2.verbose
# c1.reboot c1.pvh c1.rootfs c1.net hostile l1.dmesg (default: all).
# Settings come from /payload/rig.conf (written by rig/run.sh).
# shellcheck source-path=SCRIPTDIR source=../l1/harness.sh
. /rig/harness.sh
# shellcheck disable=SC1091 # written by rig/run.sh
. /payload/rig.conf

kernel=/payload/guest/vmlinuz
vmlinux=/payload/guest/vmlinux
initrd=/payload/guest/initramfs.cpio
initrd_virtio=/payload/guest/initramfs-virtio.cpio
guest_initrd=$initrd
extra=${RIG_GUEST_APPEND:+ $RIG_GUEST_APPEND}
cases=" ${RIG_CASES:-c1.quiet c1.verbose c2.quiet c2.verbose c1.reboot c1.pvh c1.rootfs c1.net hostile l1.dmesg} "
want() { case $cases in *" $1 "*) return 0 ;; esac; return 1; }
socks=/tmp/bhyve-sockets
mkdir -p "$socks"

exit_name() { # bhyve(8) exit statuses
    case $1 in
    0) echo reboot ;; 1) echo poweroff ;; 2) echo halt ;; 3) echo triple-fault ;; 4) echo error ;;
    *) echo "other-$1" ;;
    esac
}

# dmesg_check NAME: the guest's own kernel log (between BHYVE-RS-DMESG-BEGIN/-END in its
# console) must show the platform we give it, and no warning but the two known ones.
dmesg_check() {
    name=$1 log=/tmp/$1.dmesg
    tr -d '\r' <"/tmp/$name.console" | sed -n '/^BHYVE-RS-DMESG-BEGIN/,/^BHYVE-RS-DMESG-END/p' >"$log"
    if ! grep -q '^BHYVE-RS-DMESG-END' "$log"; then
        rig_result "$name.dmesg" missing
        rig_fail dmesg-check 1 "$name: the guest's dmesg is missing from its console"
        return 0
    fi
    rig_result "$name.dmesg_lines" "$(($(wc -l <"$log") - 2))"
    # what  pattern (busybox grep -E)
    for check in \
        "uart|ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = [0-9]+\) is a 16550A" \
        "ioapic|IOAPIC\[0\]: apic_id 0, version [0-9]+, address 0xfec00000" \
        "ioapic_routing|ACPI: Using IOAPIC for interrupt routing" \
        "clocksource|clocksource: Switched to clocksource [a-z_-]+" \
        "rtc|rtc_cmos [^ ]+: setting system clock to" \
        "acpi_s5|ACPI: PM: \(supports S0( S[1-4])* S5\)"; do
        what=${check%%|*} pattern=${check#*|}
        line=$(grep -E -m 1 "$pattern" "$log" | sed 's/^\[[^]]*\] //')
        if [ -n "$line" ]; then
            rig_result "$name.dmesg_$what" "ok: $line"
        else
            rig_result "$name.dmesg_$what" missing
            rig_fail dmesg-check 1 "$name: the guest's dmesg lacks /$pattern/"
        fi
    done
    # Warnings: a WARN block ("cut here" .. "end trace") is known harmless only if it is
    # the XSAVE consistency warning (TCG's CPUID leaf 0xD sizes, see hw-virt-rig.md).
    # Every other WARNING:/BUG:/Call Trace line, inside a block or not, fails the check.
    bad=$(awk '
        /-+\[ cut here \]-+/ { inblk = 1; known = 0; n = 0; next }
        inblk && /XSAVE consistency problem|arch\/x86\/kernel\/fpu\/xstate\.c/ { known = 1 }
        inblk { buf[++n] = $0 }
        inblk && /---\[ end trace/ {
            if (!known) for (i = 1; i <= n; i++) if (buf[i] ~ /WARNING:|BUG:|Call Trace/) print buf[i]
            inblk = 0; next
        }
        !inblk && /WARNING:|BUG:|Call Trace/ { print }
        END { if (inblk && !known) for (i = 1; i <= n; i++) if (buf[i] ~ /WARNING:|BUG:|Call Trace/) print buf[i] }
    ' "$log" | head -n 5)
    known=$(grep -c 'XSAVE consistency problem' "$log")
    if [ -n "$bad" ]; then
        rig_result "$name.dmesg_warnings" "unexpected: $(echo "$bad" | head -n 1)"
        rig_fail dmesg-check 1 "$name: unexpected warning in the guest's dmesg: $(echo "$bad" | tr '\n' '|')"
    else
        rig_result "$name.dmesg_warnings" "none unexpected (known XSAVE WARN: $known)"
    fi
}

# More vCPUs than L1 has CPUs (the CI runs L1 with one: rig/README.md, "One CPU in L1"): raise
# hw.vmm.maxcpu (default: the host's CPUs) through a tunables file, as an admin would on such a
# host; the vCPU threads then share L1's CPU.
l1_ncpu=$(grep -c '^processor' /proc/cpuinfo)
vmm_conf=/tmp/bhyve-vmm.conf

run_bhyve() { # NAME CPUS EXPECT CMDLINE [KERNEL-OPTIONS...]
    name=$1 cpus=$2 expect=$3 cmdline=$4
    shift 4
    [ $# -gt 0 ] || set -- -o "boot.kernel=$kernel"
    if [ "$cpus" -gt "$l1_ncpu" ]; then
        echo "hw.vmm.maxcpu=\"$cpus\"" >"$vmm_conf"
        rig_result "$name.tunables" "hw.vmm.maxcpu=$cpus (L1 has $l1_ncpu CPU(s))"
        set -- "$@" -o "vmm.tunables=$vmm_conf"
    fi
    rig_guest_run "$name" "$RIG_GUEST_TIMEOUT" "$expect" /payload/bhyve -c "$cpus" -m 256M -l com1,stdio \
        "$@" -o "boot.initrd=$guest_initrd" -o "boot.cmdline=$cmdline" -o "vmm.socket_dir=$socks" "rig-$cpus"
    ret=$?
    rig_result "$name.exit" "$(exit_name "$(sed -n "s/^${name}[.]vmm_status=//p" "$RIG_RESULTS" | tail -n 1)")"
    if [ -f "/tmp/$name.console" ] && grep -q "^$RIG_MARKER" "/tmp/$name.console"; then
        seen=$(sed -n 's/^BHYVE-RS-INFO cpus=//p' "/tmp/$name.console" | tr -d '\r')
        rig_result "$name.guest_cpus" "${seen:-unknown}"
        if [ "$ret" = 0 ] && [ "$seen" != "$cpus" ]; then
            rig_fail guest-cpus 1 "$name: the guest saw ${seen:-no} vCPUs, bhyve was given $cpus"
        fi
        case $cmdline in *bhyvers.test=*dmesg*) dmesg_check "$name" ;; esac
    fi
}

# The kernel's own console shows it powering off through ACPI S5 (printed after /init
# asked for it, so it cannot be in the dmesg the guest dumps before).
s5_check() { # NAME
    if tr -d '\r' <"/tmp/$1.console" | grep -q 'ACPI: PM: Preparing to enter system sleep state S5'; then
        rig_result "$1.acpi_s5_poweroff" ok
    else
        rig_result "$1.acpi_s5_poweroff" missing
        rig_fail acpi-poweroff 1 "$1: no 'Preparing to enter system sleep state S5' on the kernel's console"
    fi
}

for cpus in 1 2; do
    want "c$cpus.quiet" &&
        run_bhyve "bhyve_c$cpus.quiet" "$cpus" 1 "console=ttyS0 panic=-1 quiet bhyvers.test=info,dmesg,poweroff$extra"
    if want "c$cpus.verbose"; then
        run_bhyve "bhyve_c$cpus.verbose" "$cpus" 1 "console=ttyS0 panic=-1 bhyvers.test=info,poweroff$extra"
        [ -f "/tmp/bhyve_c$cpus.verbose.console" ] && grep -q "^$RIG_MARKER" "/tmp/bhyve_c$cpus.verbose.console" &&
            s5_check "bhyve_c$cpus.verbose"
    fi
done
want c1.reboot && run_bhyve bhyve_c1.reboot 1 0 "console=ttyS0 panic=-1 quiet bhyvers.test=info,reboot$extra"
want c1.pvh && run_bhyve bhyve_c1.pvh 1 1 "console=ttyS0 panic=-1 quiet bhyvers.test=info,dmesg,poweroff$extra" \
    -o "boot.kernel=$vmlinux" -o boot.protocol=pvh
rig_summary "^bhyve_c[0-9][.]quiet[.]start_to_marker_s\$" "bhyve.quiet_start_to_marker_s"

# guest_line NAME PREFIX: the first console line of NAME that starts with PREFIX, without it.
guest_line() {
    tr -d '\r' <"/tmp/$1.console" 2>/dev/null | sed -n "s/^$2//p" | head -n 1
}

# The virtio drivers the guest loads from its initramfs ("modules" in guest-linux/init).
modules_check() { # NAME
    mods=$(guest_line "$1" 'BHYVE-RS-MODULES ')
    failed=$(guest_line "$1" 'BHYVE-RS-MODULES-FAILED ')
    if [ -n "$mods" ]; then
        rig_result "$1.modules" "$mods"
    elif [ -n "$failed" ]; then
        rig_result "$1.modules" "failed: $failed"
        rig_fail guest-modules 1 "$1: the guest could not load its virtio modules: $failed"
        return 1
    else
        rig_result "$1.modules" missing
        rig_fail guest-modules 1 "$1: the guest did not report loading its virtio modules (no BHYVE-RS-MODULES line)"
        return 1
    fi
}

# Root file system on virtio-blk: L1's /dev/vda, the image rig/run.sh made and checks after.
if want c1.rootfs; then
    name=bhyve_c1.rootfs
    if [ ! -b /dev/vda ]; then
        rig_fail rootfs-disk 1 "$name: L1 has no /dev/vda (rig/run.sh gives L1 the ext4 image as a virtio disk)"
    else
        nonce=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
        rig_result "$name.nonce" "$nonce"
        rig_result "$name.disk_bytes" "$(blockdev --getsize64 /dev/vda 2>/dev/null || echo unknown)"
        guest_initrd=$initrd_virtio
        run_bhyve "$name" 1 1 "console=ttyS0 panic=-1 quiet root=/dev/vda rootfstype=ext4 rw bhyvers.test=info,modules,switchroot,writefile,poweroff bhyvers.nonce=$nonce$extra" \
            -o "boot.kernel=$kernel" -s 4,virtio-blk,/dev/vda
        guest_initrd=$initrd
        if [ -f "/tmp/$name.console" ] && grep -q "^$RIG_MARKER" "/tmp/$name.console" && modules_check "$name"; then
            root=$(guest_line "$name" 'BHYVE-RS-ROOT ')
            rig_result "$name.root" "${root:-$(guest_line "$name" 'BHYVE-RS-ROOT-FAILED ' | sed 's/^/failed: /')}"
            rig_result "$name.root_init" "$(guest_line "$name" 'BHYVE-RS-ROOT-INIT ')"
            write=$(guest_line "$name" 'BHYVE-RS-WRITE ')
            rig_result "$name.write" "${write:-missing}"
            seed=$(guest_line "$name" 'BHYVE-RS-SEED ')
            rig_result "$name.seed" "${seed:-missing}"
            case $root in
            *"dev=/dev/vda type=ext4 mode=rw"*) ;;
            *) rig_fail rootfs-mount 1 "$name: the guest did not mount /dev/vda as ext4 read-write (${root:-$(guest_line "$name" 'BHYVE-RS-ROOT-FAILED ')})" ;;
            esac
            case $write in
            "root=/dev/vda type=ext4 nonce=$nonce "*) ;;
            "") rig_fail rootfs-write 1 "$name: the guest reported no write (no BHYVE-RS-WRITE line)" ;;
            *) rig_fail rootfs-write 1 "$name: the guest's write is not this run's to the ext4 root (want root=/dev/vda type=ext4 nonce=$nonce; it said: $write)" ;;
            esac
        fi
    fi
fi

# virtio-net on a tap: the guest and L1 ping each other.
icmp_in_echos() {
    awk '/^Icmp:/ { if (!c) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i } else { print $c; exit } }' /proc/net/snmp
}
ping_counts() { # FILE: "transmitted N received M"
    sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) packets received.*/transmitted \1 received \2/p' "$1"
}
if want c1.net; then
    name=bhyve_c1.net
    tap=rigtap0 l1_addr=10.77.0.1 guest_addr=10.77.0.2
    if ! { tunctl -t $tap >/dev/null && ip addr add $l1_addr/24 dev $tap && ip link set $tap up; }; then
        rig_fail net-tap 1 "$name: L1 could not make tap $tap ($l1_addr/24)"
    else
        # Ping the guest once it has pinged us (its first echo request arrives).
        base=$(icmp_in_echos)
        (
            i=0
            while [ "$(icmp_in_echos)" -le "$base" ] && [ $i -lt $((RIG_GUEST_TIMEOUT * 5)) ]; do
                sleep 0.2
                i=$((i + 1))
            done
            ping -c 3 -i 0.2 -W 5 $guest_addr >"/tmp/$name.l1ping" 2>&1
        ) &
        pinger=$!
        guest_initrd=$initrd_virtio
        run_bhyve "$name" 1 1 "console=ttyS0 panic=-1 quiet bhyvers.test=info,modules,net,pinged,poweroff bhyvers.net=$guest_addr/24,$l1_addr$extra" \
            -o "boot.kernel=$kernel" -s 5,virtio-net,$tap
        guest_initrd=$initrd
        kill $pinger 2>/dev/null
        wait $pinger 2>/dev/null
        if [ -f "/tmp/$name.console" ] && grep -q "^$RIG_MARKER" "/tmp/$name.console" && modules_check "$name"; then
            netline=$(guest_line "$name" 'BHYVE-RS-NET ')
            rig_result "$name.guest_net" "${netline:-$(guest_line "$name" 'BHYVE-RS-NET-FAILED ' | sed 's/^/failed: /')}"
            g56=$(guest_line "$name" 'BHYVE-RS-PING size=56 ')
            g1472=$(guest_line "$name" 'BHYVE-RS-PING size=1472 ')
            by=$(guest_line "$name" 'BHYVE-RS-PINGED-BY ')
            l1=$(ping_counts "/tmp/$name.l1ping" 2>/dev/null)
            rig_result "$name.guest_ping_56" "${g56:-missing}"
            rig_result "$name.guest_ping_1472" "${g1472:-missing}"
            rig_result "$name.l1_ping" "${l1:-none}"
            rig_result "$name.guest_pinged_by_l1" "${by:-missing}"
            rig_result "$name.l1_tap" "$(ip -o link show $tap 2>/dev/null | sed 's/.*<\([^>]*\)>.*/\1/') rx $(cat /sys/class/net/$tap/statistics/rx_packets) tx $(cat /sys/class/net/$tap/statistics/tx_packets)"
            [ -n "$netline" ] || rig_fail net-setup 1 "$name: the guest found no Ethernet interface to address ($(guest_line "$name" 'BHYVE-RS-NET-FAILED '))"
            case $g56/$g1472 in
            "transmitted=3 received=3/transmitted=2 received=2") ;;
            *) rig_fail net-guest-ping 1 "$name: guest pinging L1: 56 bytes ${g56:-no result}, 1472 bytes ${g1472:-no result} (want every reply)" ;;
            esac
            [ "$l1" = "transmitted 3 received 3" ] ||
                rig_fail net-l1-ping 1 "$name: L1 pinging the guest: ${l1:-no result} (want 3 of 3; L1's ping said: $(tail -n 2 "/tmp/$name.l1ping" 2>/dev/null | tr '\n' ' '))"
        fi
        tunctl -d $tap >/dev/null 2>&1
    fi
fi

# Hostile input: bhyve must refuse with exit 4 and say why on stderr.
hostile() { # NAME MEM MESSAGE-PATTERN KERNEL INITRD
    name=$1 mem=$2 want=$3 k=$4 i=$5
    echo "RIG-STEP run $name"
    timeout -s KILL 40 timeout 30 /payload/bhyve -c 1 -m "$mem" -l com1,stdio -o "boot.kernel=$k" \
        -o "boot.initrd=$i" -o "boot.cmdline=console=ttyS0 panic=-1 quiet" -o "vmm.socket_dir=$socks" \
        "rig-$name" </dev/null >"/tmp/$name.out" 2>"/tmp/$name.err"
    status=$?
    msg=$(grep -m 1 . "/tmp/$name.err" | tr -d '\r')
    echo "RIG-CONSOLE-BEGIN $name"
    cat "/tmp/$name.out" "/tmp/$name.err" | sed "s/^/$name| /"
    echo "RIG-CONSOLE-END $name"
    rig_result "$name.vmm_status" "$status"
    rig_result "$name.exit" "$(exit_name "$status")"
    rig_result "$name.message" "${msg:-none}"
    if [ "$status" != 4 ]; then
        rig_fail vmm-status 25 "$name: bhyve exit status $status ($(exit_name "$status")), expected 4 (error)"
    elif ! echo "$msg" | grep -qE "$want"; then
        rig_fail hostile-message 1 "$name: stderr does not say why (want /$want/): ${msg:-nothing}"
    fi
}
if want hostile; then
    size=$(wc -c <"$kernel")
    head -c $((size / 2)) "$kernel" >/tmp/truncated.bzImage
    head -c 600 "$kernel" >/tmp/truncated-header.bzImage
    dd if=/dev/urandom of=/tmp/not-a-kernel bs=1024 count=64 2>/dev/null
    dd if=/dev/zero of=/tmp/initrd-100M bs=1048576 count=100 2>/dev/null
    hostile hostile_truncated 256M '[Tt]runcated' /tmp/truncated.bzImage "$initrd"
    hostile hostile_truncated_header 256M '[Tt]runcated' /tmp/truncated-header.bzImage "$initrd"
    hostile hostile_not_a_kernel 256M '[Uu]nrecogni[sz]ed|not a kernel|magic' /tmp/not-a-kernel "$initrd"
    hostile hostile_initrd_too_big 128M 'initrd|[Mm]odule|does not fit|too (big|large)' "$kernel" /tmp/initrd-100M
    rm -f /tmp/truncated.bzImage /tmp/truncated-header.bzImage /tmp/not-a-kernel /tmp/initrd-100M
fi

# L1's kernel log: kvm_amd must not have warned about anything we did. L1 logging the
# guest's unhandled WRMSR 0xc0010007 is known noise (not a WARNING line anyway).
bad=$(dmesg | grep -E 'WARNING:|BUG:|Call Trace' | grep -v 'Unhandled WRMSR' | head -n 3)
if ! want l1.dmesg; then
    :
elif [ -n "$bad" ]; then
    rig_result l1.dmesg "unexpected: $(echo "$bad" | head -n 1)"
    rig_fail l1-dmesg 1 "L1's kernel log has a warning: $(echo "$bad" | tr '\n' '|')"
else
    rig_result l1.dmesg "no warnings ($(dmesg | grep -c 'Unhandled WRMSR') unhandled-WRMSR notes)"
fi
exit "$RIG_STATUS"
