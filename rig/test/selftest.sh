#!/usr/bin/env bash
# Self-test of the rig: each case runs rig/run.sh for real (one outer VM at a
# time) and checks what a user sees: the exit status and the "FAILED step=" line.
#
#   rig/test/selftest.sh [--bhyve PATH] [CASE...]
#       cases: bhyve-pass marker-missing module-load guest-timeout payload-timeout
#              l1-stall bhyve-marker-missing bhyve-rootfs-stale (default: all, ~4 min cached)
#   --bhyve PATH   our static bhyve, for bhyve-marker-missing and bhyve-rootfs-stale (skipped,
#                  and saying so, without it; the environment's RIG_SELFTEST_BHYVE works too)
# Prints "N passed, M failed, K skipped"; exit status 0 only if no case failed. Each
# case's stderr is kept in $RIG_SELFTEST_KEEP/CASE.err when that is set.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
run=$here/../run.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
skipped=0
bhyve=${RIG_SELFTEST_BHYVE:-}
if [[ ${1:-} == --bhyve ]]; then
    [[ $# -ge 2 ]] || { echo "selftest: --bhyve needs a path" >&2; exit 2; }
    bhyve=$2
    shift 2
fi

# check NAME WANT_STATUS WANT_STEP -- RUN.SH ARGS...: WANT_STEP "" = no failure line
check() {
    local name=$1 want=$2 step=$3 got
    shift 4
    echo "selftest: $name: rig/run.sh $*" >&2
    set +e
    "$run" --out "$work/$name" "$@" >"$work/$name.out" 2>"$work/$name.err"
    got=$?
    set -e
    if [[ -n ${RIG_SELFTEST_KEEP:-} ]]; then
        mkdir -p "$RIG_SELFTEST_KEEP"
        cp "$work/$name.err" "$RIG_SELFTEST_KEEP/$name.err"
        cp "$work/$name.out" "$RIG_SELFTEST_KEEP/$name.out"
    fi
    local ok=1
    [[ $got == "$want" ]] || ok=0
    if [[ -n $step ]]; then
        grep -q "FAILED step=$step" "$work/$name.err" || ok=0
    else
        ! grep -q 'FAILED step=' "$work/$name.err" || ok=0
    fi
    if [[ $ok == 1 ]]; then
        echo "selftest: $name: ok (exit $got${step:+, step=$step})" >&2
        passed=$((passed + 1))
    else
        echo "selftest: $name: FAILED: exit $got (want $want), want step '${step:-none}'; stderr:" >&2
        sed 's/^/    /' "$work/$name.err" >&2
        failed=$((failed + 1))
    fi
}

cases=("$@")
((${#cases[@]})) || cases=(bhyve-pass marker-missing module-load guest-timeout payload-timeout l1-stall bhyve-marker-missing bhyve-rootfs-stale)
for c in "${cases[@]}"; do
    case $c in
        # The --bhyve payload end to end, with a stand-in that boots the guest
        # under QEMU+KVM in L1: every case passes, exit statuses map to bhyve(8)'s.
        # (Hostile input is left out: the stand-in's error messages are QEMU's, not ours.)
        bhyve-pass) check "$c" 0 "" -- --bhyve "$here/fake-bhyve.sh" --with-qemu \
            --cases "c1.quiet c1.verbose c2.quiet c2.verbose c1.reboot c1.pvh c1.rootfs c1.net l1.dmesg" ;;
        # A guest that cannot reach its init: the rig says "marker-missing" (23).
        marker-missing) check "$c" 23 marker-missing -- --peer --runs 1 --machines pc --no-count-exits \
            --guest-append 'rdinit=/nonexistent init=/nonexistent' ;;
        # The same with our bhyve: every boot of the --bhyve payload panics without an init,
        # so the run must fail with marker-missing (23), not pass.
        bhyve-marker-missing)
            if [[ -z $bhyve ]]; then
                echo "selftest: $c: SKIPPED (no --bhyve PATH / RIG_SELFTEST_BHYVE)" >&2
                skipped=$((skipped + 1))
            else
                check "$c" 23 marker-missing -- --bhyve "$bhyve" --guest-timeout 60 \
                    --cases "c1.quiet c1.pvh" --guest-append 'rdinit=/nonexistent init=/nonexistent'
            fi
            ;;
        # The root file system check must fail when the image does not hold what this run's
        # guest was told to write: a later bhyvers.nonce= on the command line wins in the
        # guest, so it writes a stale nonce; the host's look into the image says rootfs-image.
        bhyve-rootfs-stale)
            if [[ -z $bhyve ]]; then
                echo "selftest: $c: SKIPPED (no --bhyve PATH / RIG_SELFTEST_BHYVE)" >&2
                skipped=$((skipped + 1))
            else
                check "$c" 1 rootfs-image -- --bhyve "$bhyve" --guest-timeout 60 \
                    --cases c1.rootfs --guest-append 'bhyvers.nonce=stale'
            fi
            ;;
        # An outer CPU without SVM: kvm_amd does not load (21).
        module-load) check "$c" 21 module-load -- --payload "$here/payload-true" --l1-cpu qemu64,-svm ;;
        # An inner VMM that ignores SIGTERM: killed, reported as a guest timeout (24).
        guest-timeout) check "$c" 24 guest-timeout -- --payload "$here/payload-hang" ;;
        # The outer VM's limit hits while the payload runs (26).
        payload-timeout) check "$c" 26 payload-timeout -- --payload "$here/payload-sleep" --timeout 25 ;;
        # An outer VM whose console goes silent (a hung L1): stopped by the watchdog (20).
        l1-stall) check "$c" 20 l1-stall -- --payload "$here/payload-sleep" --stall 15 --timeout 120 ;;
        *) echo "selftest: unknown case '$c'" >&2; exit 2 ;;
    esac
done
echo "$passed passed, $failed failed, $skipped skipped"
[[ $failed == 0 ]]
