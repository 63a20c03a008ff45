#!/usr/bin/env bash
# Tests of rig/lib/ci.sh on made-up rig run folders (which failures rig/test/run-ci.sh retries
# (only those the emulator is known to cause) and what it prints about a failure), and of
# rig_backports_qemu (rig/lib/common.sh) when apt-get fails.
# Usage: rig/test/ci-lib.sh (exit 0 when every case gives the expected answer).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/ci.sh
. "$here/../lib/ci.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bad=0

# mk NAME STATUS FAILED-STEP "RESULT LINES" "RIG-FAIL LINES": a run folder as rig/run.sh leaves it
# (console.log with CRLF line ends, as the outer VM's serial console writes them).
mk() {
    local d=$tmp/$1
    mkdir -p "$d/consoles"
    { printf '%s\n' "rig.exit_status=$2"; [[ -z $3 ]] || printf 'rig.failed_step=%s\n' "$3"
      [[ -z $4 ]] || printf '%s\n' "$4"; } >"$d/results.txt"
    { printf 'RIG-STEP payload-start\r\n'; [[ -z $5 ]] || printf '%s\n' "$5" | sed 's/$/\r/'; } >"$d/console.log"
    printf 'line one\r\nlast console line\r\n' >"$d/consoles/bhyve_c1.quiet.log"
    echo "$d"
}
expect() { # WANT(retry|fail) DIR WHAT
    local got=fail
    if emulator_fault "$2"; then got=retry; fi
    if [[ $got == "$1" ]]; then
        echo "ok   $3: $got"
    else
        echo "FAIL $3: got $got, want $1"
        bad=1
    fi
}

# One case a line: WANT|NAME|STATUS|FAILED-STEP|RESULT LINES (;-separated)|RIG-FAIL LINES (;-separated)|WHAT
while IFS='|' read -r want name status fstep results fails what; do
    [[ -n $want && $want != '#'* ]] || continue
    d=$(mk "$name" "$status" "$fstep" "$(tr ';' '\n' <<<"$results" | sed '/^$/d')" "$(tr ';' '\n' <<<"$fails" | sed '/^$/d')")
    expect "$want" "$d" "$what"
done <<'CASES'
retry|stall|20|l1-stall|||L1 went silent (l1-stall)
retry|crash|20|l1-crash|||L1 stopped without a result (l1-crash)
fail|boot|20|l1-boot|||L1 did not boot (l1-boot)
retry|tf1|25|vmm-status|bhyve_c1.quiet.vmm_status=3;bhyve_c1.quiet.exit=triple-fault;bhyve_c1.pvh.vmm_status=1;bhyve_c1.pvh.exit=poweroff|RIG-FAIL step=vmm-status bhyve_c1.quiet: VMM exit status 3, expected 1;RIG-FAIL step=dmesg-check bhyve_c1.quiet: the guest's dmesg is missing from its console|one inner VM triple-faulted after its marker
retry|tf2|23|marker-missing|bhyve_c1.verbose.vmm_status=3;bhyve_c1.verbose.exit=triple-fault|RIG-FAIL step=marker-missing bhyve_c1.verbose: guest marker missing (VMM exit status 3)|one inner VM triple-faulted before its marker
fail|mixed|25|vmm-status|bhyve_c1.quiet.vmm_status=3;bhyve_c1.quiet.exit=triple-fault;bhyve_c1.reboot.vmm_status=1;bhyve_c1.reboot.exit=poweroff|RIG-FAIL step=vmm-status bhyve_c1.quiet: VMM exit status 3, expected 1;RIG-FAIL step=vmm-status bhyve_c1.reboot: VMM exit status 1, expected 0|a triple fault and a wrong status that is not one
fail|status|25|vmm-status|bhyve_c1.reboot.vmm_status=1;bhyve_c1.reboot.exit=poweroff|RIG-FAIL step=vmm-status bhyve_c1.reboot: VMM exit status 1, expected 0|a wrong status alone
fail|err|23|marker-missing|bhyve_c1.quiet.vmm_status=4;bhyve_c1.quiet.exit=error|RIG-FAIL step=marker-missing bhyve_c1.quiet: guest marker missing (VMM exit status 4)|the VMM stopped with an error before the marker
fail|dmesg|1|dmesg-check|bhyve_c1.quiet.vmm_status=1;bhyve_c1.quiet.exit=poweroff|RIG-FAIL step=dmesg-check bhyve_c1.quiet: unexpected warning in the guest's dmesg|a warning in the guest's dmesg
fail|l1dmesg|1|l1-dmesg|bhyve_c1.quiet.vmm_status=3;bhyve_c1.quiet.exit=triple-fault|RIG-FAIL step=vmm-status bhyve_c1.quiet: VMM exit status 3, expected 1;RIG-FAIL step=l1-dmesg L1's kernel log has a warning: WARNING: CPU: 0 PID: 1 at arch/x86/kvm/svm/svm.c|a triple fault and a warning in L1's log
fail|timeout|24|guest-timeout|bhyve_c1.quiet.vmm_status=143|RIG-FAIL step=guest-timeout bhyve_c1.quiet: the VMM did not finish within 150s (marker missing)|an inner VM that did not finish
fail|nofail|1||||a failed payload without RIG-FAIL lines
CASES
expect fail "$tmp/missing" "no run folder at all"

# why_failed names the step, each RIG-FAIL line, the odd status and the failing console's tail.
why=$(why_failed "$tmp/tf1")
for want in 'why: vmm-status (exit status 25)' 'RIG-FAIL step=vmm-status bhyve_c1.quiet: VMM exit status 3, expected 1' \
    'bhyve_c1.quiet.exit=triple-fault' "last 6 lines of bhyve_c1.quiet's console:" '| last console line'; do
    if grep -qF -- "$want" <<<"$why"; then
        echo "ok   why_failed shows: $want"
    else
        echo "FAIL why_failed does not show: $want"
        bad=1
    fi
done
if grep -q 'bhyve_c1.pvh.exit=poweroff' <<<"$why" || grep -q $'\r' <<<"$why"; then
    echo "FAIL why_failed shows a passing run's status or a carriage return"
    bad=1
fi
# The backports emulator: when apt-get cannot fetch it (no network here: a stand-in apt-get that
# fails), rig_backports_qemu stops with its step named, so run-ci.sh can fall back to the host's.
mkdir -p "$tmp/bin"
printf '#!/bin/sh\necho "stand-in apt-get: no network" >&2\nexit 100\n' >"$tmp/bin/apt-get"
chmod +x "$tmp/bin/apt-get"
rc=0
err=$(PATH=$tmp/bin:$PATH BHYVE_RS_CACHE=$tmp/cache bash -c ". '$here/../lib/common.sh' && rig_backports_qemu" 2>&1 >/dev/null) || rc=$?
if [[ $rc != 0 ]] && grep -q 'FAILED step=backports-qemu: apt-get update of .*-backports failed' <<<"$err"; then
    echo "ok   rig_backports_qemu names its step when apt-get fails (status $rc)"
else
    echo "FAIL rig_backports_qemu with a failing apt-get: status $rc, said: $err"
    bad=1
fi
exit "$bad"
