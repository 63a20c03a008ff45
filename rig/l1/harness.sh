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
#     kvm:kvm_exit hist trigger), NAME.exits_by_reason, NAME.userspace_exits[_by_reason].
#     Times come from /proc/uptime (10 ms resolution): start is read just before
#     the VMM is started, the marker time when its line arrives on the VMM's
#     stdout, the total when the VMM's stdout closes (it exited).
#     The VMM's console is printed between "RIG-CONSOLE-BEGIN NAME" and
#     "RIG-CONSOLE-END NAME", each line prefixed by "NAME| ".
#     Returns 0, or 23 marker missing, 24 timeout, 25 VMM exit status != EXPECT_STATUS
#     (EXPECT_STATUS "-" accepts any).
#   rig_summary PATTERN LABEL     min/avg/max of the results whose key matches PATTERN

RIG_MARKER=${RIG_MARKER:-BHYVE-RS-GUEST-MARKER}
RIG_STATUS=0
RIG_RESULTS=/tmp/rig-results
RIG_TRACE=/sys/kernel/tracing
RIG_EXIT_HIST='hist:keys=exit_reason:size=256'
RIG_UEXIT_HIST='hist:keys=reason'
RIG_COUNTING=0
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
    RIG_COUNTING=1
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
    echo "!$RIG_EXIT_HIST" >"$RIG_TRACE/events/kvm/kvm_exit/trigger"
    echo "!$RIG_UEXIT_HIST" >"$RIG_TRACE/events/kvm/kvm_userspace_exit/trigger"
    RIG_COUNTING=0
}

rig_guest_run() { # NAME TIMEOUT_S EXPECT_STATUS CMD...
    name=$1 limit=$2 expect=$3
    shift 3
    echo "RIG-STEP run $name"
    rm -f "/tmp/$name.console" "/tmp/$name.res"
    t0=$(rig_uptime)
    # busybox timeout sends SIGTERM once; a VMM that survives it is killed 10 s later.
    { timeout -s KILL $((limit + 10)) timeout "$limit" "$@" </dev/null 2>&1; echo "RIG-VMM-STATUS $?"; } | awk \
        -v t0="$t0" -v marker="$RIG_MARKER" -v out="/tmp/$name.console" -v res="/tmp/$name.res" '
        function now(  l, a) { getline l <"/proc/uptime"; close("/proc/uptime"); split(l, a, " "); return a[1] }
        { sub(/\r$/, "") }
        match($0, /RIG-VMM-STATUS [0-9]+$/) {
            status = substr($0, RSTART + 15); $0 = substr($0, 1, RSTART - 1)
            if ($0 == "") next
        }
        !found && index($0, marker) { found = 1; tm = now() - t0 }
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
