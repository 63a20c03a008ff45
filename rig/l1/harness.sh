# shellcheck shell=sh
# Payload-side helpers, sourced by payload scripts inside the outer VM (L1) from
# /rig/harness.sh. busybox sh (ash): no bash-isms.
#
#   rig_result KEY VALUE          print "RIG-RESULT KEY=VALUE" (and keep it for rig_summary)
#   rig_fail STEP STATUS MESSAGE  print "RIG-FAIL step=STEP MESSAGE"; the first failure's
#                                 STATUS becomes $RIG_STATUS, the payload's exit status
#   rig_guest_run NAME TIMEOUT_S EXPECT_STATUS CMD [ARGS...]
#                                 run a VMM, timestamp its serial output, report:
#       NAME.marker=found|missing  NAME.start_to_marker_s  NAME.total_s  NAME.vmm_status
#     and, between rig_exits_start/rig_exits_stop, NAME.exits (all exits KVM took, from a
#     kvm:kvm_exit hist trigger), NAME.exits_by_reason, NAME.userspace_exits[_by_reason],
#     NAME.pio_by_port (kvm:kvm_pio: every port access KVM saw, in-kernel or not, as
#     PORT/in|out:count), NAME.mmio_by_gpa (kvm:kvm_mmio: GPA/read|write|read_unsatisfied),
#     NAME.msr_by_index (kvm:kvm_msr: MSR/rdmsr|wrmsr).
#     Times come from /proc/uptime (10 ms resolution): start is read just before
#     the VMM is started, the marker time when its line arrives on the VMM's
#     stdout, the total when the VMM's stdout closes (it exited).
#     The VMM's console is printed between "RIG-CONSOLE-BEGIN NAME" and
#     "RIG-CONSOLE-END NAME", each line prefixed by "NAME| ".
#     Returns 0, or 23 marker missing, 24 timeout, 25 VMM exit status != EXPECT_STATUS
#     (EXPECT_STATUS "-" accepts any).
#   rig_summary PATTERN LABEL     min/avg/max of the results whose key matches PATTERN
#   rig_timeline_start / rig_timeline_stop NAME
#                                 record every KVM event of the runs in between (kvm_entry,
#                                 kvm_exit, kvm_userspace_exit, kvm_pio, kvm_mmio, KVM_CREATE_VM
#                                 and KVM_CREATE_VCPU ioctls) with a start and a marker stamp
#                                 from rig_guest_run, then report the phases of the run
#                                 (NAME.tl_*: see _rig_timeline)

RIG_MARKER=${RIG_MARKER:-BHYVE-RS-GUEST-MARKER}
RIG_STATUS=0
RIG_RESULTS=/tmp/rig-results
RIG_TRACE=/sys/kernel/tracing
RIG_EXIT_HIST='hist:keys=exit_reason:size=256'
RIG_UEXIT_HIST='hist:keys=reason'
RIG_PIO_HIST='hist:keys=port.hex,rw:size=512'
RIG_MMIO_HIST='hist:keys=gpa.hex,type:size=1024'
RIG_MSR_HIST='hist:keys=ecx.hex,write:size=256'
RIG_COUNTING=0
RIG_TRACE_MARK=
: >"$RIG_RESULTS"

rig_result() {
    echo "RIG-RESULT $1=$2"
    echo "$1=$2" >>"$RIG_RESULTS"
}

rig_fail() {
    echo "RIG-FAIL step=$1 $3"
    [ "$RIG_STATUS" = 0 ] && RIG_STATUS=$2
    return 0
}

rig_uptime() { cut -d' ' -f1 /proc/uptime; }

# Exit counting through hist triggers: exact counts, and they survive the VM
# (KVM's debugfs statistics vanish with it).
rig_exits_start() {
    RIG_COUNTING=0
    [ -w "$RIG_TRACE/events/kvm/kvm_exit/trigger" ] || return 1
    echo "$RIG_EXIT_HIST" >"$RIG_TRACE/events/kvm/kvm_exit/trigger" || return 1
    echo "$RIG_UEXIT_HIST" >"$RIG_TRACE/events/kvm/kvm_userspace_exit/trigger" || return 1
    # Per port / address / MSR: best effort (the totals above do not depend on them).
    echo "$RIG_PIO_HIST" >"$RIG_TRACE/events/kvm/kvm_pio/trigger" 2>/dev/null || true
    echo "$RIG_MMIO_HIST" >"$RIG_TRACE/events/kvm/kvm_mmio/trigger" 2>/dev/null || true
    echo "$RIG_MSR_HIST" >"$RIG_TRACE/events/kvm/kvm_msr/trigger" 2>/dev/null || true
    RIG_COUNTING=1
}

# _rig_hist_keys FILE KIND: "TOTAL k1/k2:count,..." for a two-key histogram, most frequent
# first, at most 40 entries. KIND names the second key's values: pio (rw), mmio (type), msr (write).
_rig_hist_keys() {
    awk -v kind="$2" '
    BEGIN {
        if (kind == "pio") { n["0"] = "in"; n["1"] = "out" }
        if (kind == "mmio") { n["0"] = "read_unsatisfied"; n["1"] = "read"; n["2"] = "write" }
        if (kind == "msr") { n["0"] = "rdmsr"; n["1"] = "wrmsr" }
    }
    /^\{/ {
        line = $0
        sub(/^\{ */, "", line)
        split(line, halves, "}")
        c = halves[2]; sub(/.*hitcount: */, "", c); c += 0
        k = split(halves[1], parts, ",")
        key = ""
        for (i = 1; i <= k; i++) {
            v = parts[i]; sub(/^[^:]*: */, "", v); gsub(/ /, "", v)
            if (i == 1 && v ~ /^0x/) { sub(/^0x0*/, "0x", v); if (v == "0x") v = "0x0" }
            if (i == 2 && (v in n)) v = n[v]
            key = key (i > 1 ? "/" : "") v
        }
        cnt[++m] = c; nm[m] = key
    }
    /Hits:/ { total = $2 }
    END {
        out = ""
        for (i = 1; i <= m && i <= 40; i++) {
            best = 0
            for (j = 1; j <= m; j++) if (!(j in used) && (best == 0 || cnt[j] > cnt[best])) best = j
            used[best] = 1
            out = out (out == "" ? "" : ",") nm[best] ":" cnt[best]
        }
        printf "%s %s\n", (total == "" ? 0 : total), (out == "" ? "-" : out)
    }' "$1"
}

# _rig_hist FILE KIND: "TOTAL reason:count,reason:count,..." (most frequent first)
_rig_hist() {
    awk -v kind="$2" '
    BEGIN {
        if (kind == "svm") {
            n["0"] = "read_cr0"; n["3"] = "read_cr3"; n["4"] = "read_cr4"; n["8"] = "read_cr8"
            n["16"] = "write_cr0"; n["19"] = "write_cr3"; n["20"] = "write_cr4"; n["24"] = "write_cr8"
            for (i = 0; i < 16; i++) { n[32 + i ""] = "read_dr" i; n[48 + i ""] = "write_dr" i }
            n["65"] = "excp_db"; n["70"] = "excp_ud"; n["78"] = "excp_pf"
            n["81"] = "excp_ac"; n["82"] = "excp_mc"
            n["96"] = "intr"; n["97"] = "nmi"; n["98"] = "smi"; n["99"] = "init"; n["100"] = "vintr"
            n["101"] = "cr0_sel_write"; n["110"] = "rdtsc"; n["111"] = "rdpmc"; n["114"] = "cpuid"; n["115"] = "rsm"
            n["116"] = "iret"; n["118"] = "invd"; n["119"] = "pause"; n["120"] = "hlt"
            n["121"] = "invlpg"; n["122"] = "invlpga"; n["123"] = "io"; n["124"] = "msr"
            n["125"] = "task_switch"; n["127"] = "shutdown"; n["128"] = "vmrun"; n["129"] = "vmmcall"
            n["130"] = "vmload"; n["131"] = "vmsave"; n["132"] = "stgi"; n["133"] = "clgi"
            n["135"] = "rdtscp"; n["137"] = "wbinvd"; n["138"] = "monitor"; n["139"] = "mwait"
            n["141"] = "xsetbv"; n["143"] = "efer_write_trap"; n["1024"] = "npf"
            n["1025"] = "avic_incomplete_ipi"; n["1026"] = "avic_unaccelerated_access"
        } else {
            n["0"] = "unknown"; n["1"] = "exception"; n["2"] = "io"; n["3"] = "hypercall"; n["4"] = "debug"; n["5"] = "hlt"
            n["6"] = "mmio"; n["7"] = "irq_window_open"; n["8"] = "shutdown"; n["9"] = "fail_entry"
            n["10"] = "intr"; n["11"] = "set_tpr"; n["12"] = "tpr_access"; n["17"] = "internal_error"; n["24"] = "system_event"
            n["29"] = "x86_rdmsr"; n["30"] = "x86_wrmsr"
        }
    }
    /^\{/ {
        line = $0; gsub(/[{}:]/, " ", line); split(line, f, " ")
        # f[1] key name, f[2] value, f[3] "hitcount", f[4] count
        k = f[2]; c = f[4]
        name = (k in n) ? n[k] : k
        cnt[++m] = c; nm[m] = name
    }
    /Hits:/ { total = $2 }
    END {
        # selection sort, most frequent first
        out = ""
        for (i = 1; i <= m; i++) {
            best = 0
            for (j = 1; j <= m; j++) if (!(j in used) && (best == 0 || cnt[j] + 0 > cnt[best] + 0)) best = j
            used[best] = 1
            out = out (out == "" ? "" : ",") nm[best] ":" cnt[best]
        }
        printf "%s %s\n", (total == "" ? 0 : total), (out == "" ? "-" : out)
    }' "$1"
}

rig_exits_stop() { # NAME
    [ "$RIG_COUNTING" = 1 ] || { rig_result "$1.exits" unavailable; return 0; }
    # shellcheck disable=SC2046 # split "TOTAL BREAKDOWN" into two words
    set -- "$1" $(_rig_hist "$RIG_TRACE/events/kvm/kvm_exit/hist" svm)
    rig_result "$1.exits" "$2"
    rig_result "$1.exits_by_reason" "$3"
    name=$1
    # shellcheck disable=SC2046
    set -- "$1" $(_rig_hist "$RIG_TRACE/events/kvm/kvm_userspace_exit/hist" user)
    rig_result "$name.userspace_exits" "$2"
    rig_result "$name.userspace_exits_by_reason" "$3"
    for ev in pio:kvm_pio:port mmio:kvm_mmio:gpa msr:kvm_msr:index; do
        kind=${ev%%:*} rest=${ev#*:}
        file=$RIG_TRACE/events/kvm/${rest%%:*}/hist
        grep -q '^{' "$file" 2>/dev/null || grep -q 'Hits:' "$file" 2>/dev/null || continue
        # shellcheck disable=SC2046
        set -- "$name" $(_rig_hist_keys "$file" "$kind")
        rig_result "$name.${kind}_total" "$2"
        rig_result "$name.${kind}_by_${rest#*:}" "$3"
    done
    echo "!$RIG_EXIT_HIST" >"$RIG_TRACE/events/kvm/kvm_exit/trigger"
    echo "!$RIG_UEXIT_HIST" >"$RIG_TRACE/events/kvm/kvm_userspace_exit/trigger"
    echo "!$RIG_PIO_HIST" >"$RIG_TRACE/events/kvm/kvm_pio/trigger" 2>/dev/null || true
    echo "!$RIG_MMIO_HIST" >"$RIG_TRACE/events/kvm/kvm_mmio/trigger" 2>/dev/null || true
    echo "!$RIG_MSR_HIST" >"$RIG_TRACE/events/kvm/kvm_msr/trigger" 2>/dev/null || true
    RIG_COUNTING=0
}

rig_guest_run() { # NAME TIMEOUT_S EXPECT_STATUS CMD...
    name=$1 limit=$2 expect=$3
    shift 3
    echo "RIG-STEP run $name"
    rm -f "/tmp/$name.console" "/tmp/$name.res"
    [ -n "$RIG_TRACE_MARK" ] && echo RIG-START >"$RIG_TRACE_MARK"
    t0=$(rig_uptime)
    # busybox timeout sends SIGTERM once; a VMM that survives it is killed 10 s later.
    { timeout -s KILL $((limit + 10)) timeout "$limit" "$@" </dev/null 2>&1; echo "RIG-VMM-STATUS $?"; } | awk \
        -v t0="$t0" -v marker="$RIG_MARKER" -v out="/tmp/$name.console" -v res="/tmp/$name.res" \
        -v tmark="$RIG_TRACE_MARK" '
        function now(  l, a) { getline l <"/proc/uptime"; close("/proc/uptime"); split(l, a, " "); return a[1] }
        { sub(/\r$/, "") }
        match($0, /RIG-VMM-STATUS [0-9]+$/) {
            status = substr($0, RSTART + 15); $0 = substr($0, 1, RSTART - 1)
            if ($0 == "") next
        }
        !found && index($0, marker) {
            found = 1; tm = now() - t0
            if (tmark != "") { print "RIG-MARKER" >tmark; fflush(tmark) }
        }
        { print >out }
        END {
            t1 = now()
            printf "found=%d\nmarker_s=%.2f\ntotal_s=%.2f\nstatus=%s\n", found, tm, t1 - t0, status >res
        }'
    found=0 marker_s=0 total_s=0 status=
    # shellcheck disable=SC1090
    . "/tmp/$name.res"
    echo "RIG-CONSOLE-BEGIN $name"
    [ -f "/tmp/$name.console" ] && sed "s/^/$name| /" "/tmp/$name.console"
    echo "RIG-CONSOLE-END $name"
    rig_result "$name.vmm_status" "$status"
    rig_result "$name.total_s" "$total_s"
    if [ "$found" = 1 ]; then
        rig_result "$name.marker" found
        rig_result "$name.start_to_marker_s" "$marker_s"
    else
        rig_result "$name.marker" missing
    fi
    # busybox timeout kills with SIGTERM (status 143), then SIGKILL (137); a VMM
    # that catches SIGTERM exits with its own status, so the clock decides too.
    timed_out=0
    case $status in 124 | 143 | 137) timed_out=1 ;; esac
    awk -v t="$total_s" -v l="$limit" 'BEGIN { exit !(t + 0 >= l - 0.5) }' && timed_out=1
    if [ "$timed_out" = 1 ]; then
        rig_fail guest-timeout 24 "$name: the VMM did not finish within ${limit}s (marker $([ "$found" = 1 ] && echo seen || echo missing))"
        return 24
    fi
    if [ "$found" != 1 ]; then
        rig_fail marker-missing 23 "$name: guest marker '$RIG_MARKER' missing from the VMM's output (VMM exit status $status)"
        return 23
    fi
    if [ "$expect" != - ] && [ "$status" != "$expect" ]; then
        rig_fail vmm-status 25 "$name: VMM exit status $status, expected $expect"
        return 25
    fi
    return 0
}

rig_summary() { # PATTERN LABEL: min/avg/max over the values whose key matches PATTERN
    awk -F= -v pat="$1" -v label="$2" '
        $1 ~ pat && $2 ~ /^[0-9.]+$/ { v = $2 + 0; s += v; n++; if (n == 1 || v < lo) lo = v; if (v > hi) hi = v }
        END { if (n) printf "RIG-RESULT %s=min %.2f avg %.2f max %.2f n %d\n", label, lo, s / n, hi, n }' "$RIG_RESULTS"
}

# Timeline of one run from the kernel's own trace buffer (clock: mono).
rig_timeline_start() {
    t=$RIG_TRACE
    [ -w "$t/trace_marker" ] || return 1
    echo 0 >"$t/tracing_on"
    echo mono >"$t/trace_clock" 2>/dev/null || true
    echo 32768 >"$t/buffer_size_kb"
    : >"$t/trace"
    for e in kvm_entry kvm_exit kvm_userspace_exit kvm_pio kvm_mmio; do
        echo 1 >"$t/events/kvm/$e/enable" || return 1
    done
    if [ -w "$t/events/syscalls/sys_enter_ioctl/filter" ]; then
        echo 'cmd == 0xae01 || cmd == 0xae41' >"$t/events/syscalls/sys_enter_ioctl/filter"
        echo 1 >"$t/events/syscalls/sys_enter_ioctl/enable"
    fi
    echo 1 >"$t/tracing_on"
    RIG_TRACE_MARK=$t/trace_marker
}

rig_timeline_stop() { # NAME
    t=$RIG_TRACE
    [ -n "$RIG_TRACE_MARK" ] || { rig_result "$1.tl" unavailable; return 0; }
    echo 0 >"$t/tracing_on"
    for e in kvm_entry kvm_exit kvm_userspace_exit kvm_pio kvm_mmio; do echo 0 >"$t/events/kvm/$e/enable"; done
    echo 0 >"$t/events/syscalls/sys_enter_ioctl/enable" 2>/dev/null || true
    RIG_TRACE_MARK=
    _rig_timeline "$1" <"$t/trace" >/tmp/timeline-results
    : >"$t/trace"
    echo 1408 >"$t/buffer_size_kb"
    while IFS="=" read -r key value; do rig_result "$key" "$value"; done </tmp/timeline-results
    rm -f /tmp/timeline-results
}

# _rig_timeline NAME <trace: KEY=VALUE lines, times in seconds from RIG-START:
#   tl_create_vm_s, tl_create_vcpu_s   the first KVM_CREATE_VM / KVM_CREATE_VCPU ioctl
#   tl_first_entry_s                   the first VM entry (first KVM_RUN)
#   tl_first_kernel_exit_s             the first exit at a kernel-half RIP (>= 0xffff8000...):
#                                      the kernel proper runs (firmware, decompressor before)
#   tl_marker_s                        the guest's marker on the VMM's stdout
#   tl_exits_pre_kernel, tl_exits_kernel   exits before / from the first kernel-half exit to the marker
#   tl_in_guest_s                      time inside the guest (entry to exit), first entry to marker
#   tl_in_kvm_s                        exit to the next entry when KVM handled it in the kernel
#   tl_in_userspace_s                  userspace exit to the next entry (the VMM's share)
#   tl_userspace_by                    that time by what the exit was: "pio PORT in|out" or
#                                      "mmio GPA", count:milliseconds, largest first (20)
#   tl_longest_runs                    the 8 longest stays in the guest: start:duration:exit reason@rip
#   tl_slow_userspace                  the first 10 userspace exits that took 20 ms or more:
#                                      time:milliseconds:what
_rig_timeline() {
    awk -v name="$1" '
    function ts(  a) { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+[.][0-9]+:$/) { a = $i; sub(/:$/, "", a); return a + 0 } return -1 }
    function field(key,  i) { for (i = 1; i < NF; i++) if ($i == key) return $(i + 1); return "" }
    function hexhigh(r) { return (length(r) >= 18 && substr(r, 3, 4) == "ffff") }
    {
        t = ts(); if (t < 0) next
        if (index($0, "tracing_mark_write: RIG-START")) { start = t; next }
        if (index($0, "tracing_mark_write: RIG-MARKER")) { marker = t; next }
        if (start == "") next
        if (index($0, "sys_ioctl(") || index($0, "sys_ioctl ")) {
            if (index($0, "ae01") && cvm == "") cvm = t
            if (index($0, "ae41") && cvc == "") cvc = t
            next
        }
        # the task-pid field before "[CPU]" (one vCPU per thread; QEMU names them "CPU 0/KVM")
        tid = ""
        for (i = 2; i <= NF; i++) if ($i ~ /^\[[0-9]+\]$/) { tid = $(i - 1); break }
        if ($0 ~ /kvm_entry:/) {
            if (first == "") first = t
            if (marker == "") {
                if (tid in ex) {
                    d = t - ex[tid]
                    if (user[tid]) {
                        tu += d; uc[what[tid]]++; ut[what[tid]] += d
                        if (d >= 0.02 && nslow < 10) slow[++nslow] = sprintf("%.3f:%.1f:", ex[tid] - start, d * 1000) what[tid]
                    } else tk += d
                }
            }
            delete ex[tid]; user[tid] = 0; what[tid] = "?"
            en[tid] = t
            next
        }
        if ($0 ~ /kvm_exit:/) {
            rip = field("rip"); reason = field("reason")
            if (marker == "") {
                if (kfirst == "" && hexhigh(rip)) kfirst = t
                if (kfirst == "") pre++; else kern++
                if (tid in en) {
                    d = t - en[tid]; tg += d
                    # keep the 8 longest stays in the guest
                    for (j = 1; j <= 8; j++) if (!(j in ld) || d > ld[j]) break
                    if (j <= 8) {
                        for (k = 8; k > j; k--) if ((k - 1) in ld) { ld[k] = ld[k - 1]; ls[k] = ls[k - 1]; lr[k] = lr[k - 1] }
                        ld[j] = d; ls[j] = en[tid]; lr[j] = reason "@" rip
                    }
                }
            }
            delete en[tid]; ex[tid] = t
            next
        }
        if ($0 ~ /kvm_pio:/) {
            p = $0; sub(/.*kvm_pio: /, "", p); split(p, w, " ")
            what[tid] = "pio " w[3] " " (w[1] ~ /write/ ? "out" : "in")
            next
        }
        if ($0 ~ /kvm_mmio:/) {
            g = field("gpa"); sub(/^0x0*/, "0x", g)
            what[tid] = "mmio " g
            next
        }
        if ($0 ~ /kvm_userspace_exit:/) {
            user[tid] = 1
            if (!(tid in what) || what[tid] == "?") { r = $0; sub(/.*kvm_userspace_exit: *(reason)? */, "", r); what[tid] = "exit " r }
            next
        }
    }
    END {
        f = "%.3f"
        printf "%s.tl_create_vm_s=%s\n", name, (cvm == "" ? "-" : sprintf(f, cvm - start))
        printf "%s.tl_create_vcpu_s=%s\n", name, (cvc == "" ? "-" : sprintf(f, cvc - start))
        printf "%s.tl_first_entry_s=%s\n", name, (first == "" ? "-" : sprintf(f, first - start))
        printf "%s.tl_first_kernel_exit_s=%s\n", name, (kfirst == "" ? "-" : sprintf(f, kfirst - start))
        printf "%s.tl_marker_s=%s\n", name, (marker == "" ? "-" : sprintf(f, marker - start))
        printf "%s.tl_exits_pre_kernel=%d\n", name, pre
        printf "%s.tl_exits_kernel=%d\n", name, kern
        printf "%s.tl_in_guest_s=%.3f\n", name, tg
        printf "%s.tl_in_kvm_s=%.3f\n", name, tk
        printf "%s.tl_in_userspace_s=%.3f\n", name, tu
        s = ""
        for (n = 0; n < 20; n++) {
            best = ""
            for (k in ut) if (!(k in done) && (best == "" || ut[k] > ut[best])) best = k
            if (best == "") break
            done[best] = 1
            s = s (s == "" ? "" : ",") best ":" uc[best] ":" sprintf("%.1f", ut[best] * 1000)
        }
        gsub(/ /, "_", s)
        printf "%s.tl_userspace_by=%s\n", name, s
        s = ""
        for (j = 1; j <= 8 && (j in ld); j++) s = s (s == "" ? "" : ",") sprintf("%.3f:%.3f:", ls[j] - start, ld[j]) lr[j]
        printf "%s.tl_longest_runs=%s\n", name, s
        s = ""
        for (j = 1; j <= nslow; j++) s = s (s == "" ? "" : ",") slow[j]
        gsub(/ /, "_", s)
        printf "%s.tl_slow_userspace=%s\n", name, (s == "" ? "-" : s)
    }'
}
