# shellcheck shell=bash
# Reading a finished rig run's folder (rig/run.sh --out DIR): used by rig/test/run-ci.sh, tested
# by rig/test/ci-lib.sh on made-up folders.

# Why a rig run failed, in a few lines: the failed step, each RIG-FAIL line, and the tail of the
# first failing inner VM's console. rig/run.sh prints the same to stderr, but before the checks,
# so a CI log that keeps only its last lines would lose it.
why_failed() { # RUN-DIR
    # Never fails (a grep that finds nothing must not end a caller running under errexit and
    # pipefail): it only reports.
    local res=$1/results.txt first
    echo "--- why: $(sed -n 's/^rig[.]failed_step=//p' "$res" 2>/dev/null | tail -n 1) (exit status $(sed -n 's/^rig[.]exit_status=//p' "$res" 2>/dev/null | tail -n 1))"
    { tr -d '\r' <"$1/console.log" | grep '^RIG-FAIL ' | head -n 8 | sed 's/^/  /'; } 2>/dev/null || true
    { grep -E '[.](vmm_status|exit)=' "$res" | grep -vE '=(0|1|4|poweroff|reboot|error)$' | sed 's/^/  /'; } 2>/dev/null || true
    first=$({ tr -d '\r' <"$1/console.log" | sed -n 's/^RIG-FAIL step=[^ ]* \([^:]*\):.*/\1/p' | head -n 1; } 2>/dev/null || true)
    if [[ -n $first && -f $1/consoles/$first.log ]]; then
        echo "  last 6 lines of $first's console:"
        tail -n 6 "$1/consoles/$first.log" | tr -d '\r' | cut -c1-160 | sed 's/^/  | /'
    fi
    return 0
}

# Failures the emulator is known to cause (rig/README.md, "L1 hangs" and "Inner-guest triple
# faults"), none of which an L2 monitor can cause through the KVM API on real hardware:
#   l1-stall   the outer VM went silent for good: TCG spinning in its nested-SVM code;
#   l1-crash   the outer VM stopped without a result: L1's own kernel faulted in kvm_amd right
#              after an emulated #VMEXIT (seen: "TASK stack guard page was hit" in __svm_vcpu_run);
#   every failing inner VM triple-faulted (status 3), at random points (in the decompressor, in an
#              early printk, in the middle of a dmesg dump after the marker) in runs whose other
#              boots of the same binary and guest passed.
# Anything else (a wrong status that is not a triple fault, a missing marker without one, a
# dmesg warning, the guest's files, the pings, the hostile inputs, L1's log) is never retried.
emulator_fault() { # RUN-DIR
    local res=$1/results.txt fs names n
    [[ -f $res ]] || return 1
    fs=$(sed -n 's/^rig[.]failed_step=//p' "$res" | tail -n 1)
    case $fs in l1-stall | l1-crash) return 0 ;; esac
    names=$(tr -d '\r' <"$1/console.log" | sed -n 's/^RIG-FAIL step=[^ ]* \([^:]*\):.*/\1/p' | sort -u)
    [[ -n $names ]] || return 1
    for n in $names; do
        grep -qFx "${n}.exit=triple-fault" "$res" || return 1
    done
    return 0
}
