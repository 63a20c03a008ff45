#!/usr/bin/env bash
# End-to-end test of rig/test/run-ci.sh's rig step with a stand-in rig/run.sh (no outer VM, no
# network): a failure only the emulator is known to cause is retried, at most twice, and the last
# attempt decides; any other failure is not retried; a failing step ends with its reasons ("--- why:").
# Usage: rig/test/ci-retry.sh (exit 0 when every scenario ends as expected).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bad=0

# A tree with the real run-ci.sh and libraries, and a stand-in rig/run.sh that plays the outcomes
# listed in $STUB_SEQ (comma-separated: tf = one inner VM triple-faulted, status = a wrong exit
# status that is not a triple fault, pass), one per call, counting its calls.
mkdir -p "$tmp/tree/rig/test" "$tmp/tree/rig/lib" "$tmp/bin"
cp "$here/run-ci.sh" "$tmp/tree/rig/test/"
cp "$here/../lib/"*.sh "$tmp/tree/rig/lib/"
cat >"$tmp/tree/rig/run.sh" <<'STUB'
#!/usr/bin/env bash
out=${*: -1}
mkdir -p "$out/consoles"
n=$(cat "$STUB_COUNT" 2>/dev/null || echo 0)
echo $((n + 1)) >"$STUB_COUNT"
IFS=, read -r -a seq <<<"$STUB_SEQ"
case ${seq[$n]:-pass} in
tf)
    printf 'bhyve_c1.quiet.vmm_status=3\nbhyve_c1.quiet.exit=triple-fault\nrig.exit_status=25\nrig.failed_step=vmm-status\n' >"$out/results.txt"
    printf 'RIG-FAIL step=vmm-status bhyve_c1.quiet: VMM exit status 3, expected 1\r\n' >"$out/console.log"
    printf 'early boot line\r\n' >"$out/consoles/bhyve_c1.quiet.log"
    exit 25 ;;
status)
    printf 'bhyve_c1.reboot.vmm_status=1\nbhyve_c1.reboot.exit=poweroff\nrig.exit_status=25\nrig.failed_step=vmm-status\n' >"$out/results.txt"
    printf 'RIG-FAIL step=vmm-status bhyve_c1.reboot: VMM exit status 1, expected 0\r\n' >"$out/console.log"
    exit 25 ;;
*)
    printf 'bhyve_c1.quiet.exit=poweroff\nrig.exit_status=0\n' >"$out/results.txt"
    : >"$out/console.log"
    exit 0 ;;
esac
STUB
chmod +x "$tmp/tree/rig/run.sh"
# The host tools run-ci.sh looks for, as stand-ins (this test must not install anything).
for t in qemu-system-x86_64 cpio depmod lz4 mke2fs apt-get apt-cache dpkg-deb; do
    printf '#!/bin/sh\necho "QEMU emulator version 0 (stand-in)"\n' >"$tmp/bin/$t"
    chmod +x "$tmp/bin/$t"
done

scenario() { # NAME STUB_SEQ WANT_STATUS WANT_CALLS WANT_TEXT...
    local name=$1 seq=$2 want=$3 calls=$4 rc=0 log got t
    shift 4
    log=$tmp/$name.log
    rm -f "$tmp/count"
    PATH=$tmp/bin:$PATH STUB_SEQ=$seq STUB_COUNT=$tmp/count RIG_CI_L1_QEMU=host \
        bash "$tmp/tree/rig/test/run-ci.sh" --bhyve /bin/true --skip-selftest --out "$tmp/out-$name" >"$log" 2>&1 || rc=$?
    # What the rig step itself said goes to its log; the test reads both.
    cat "$tmp/out-$name/rig.log" >>"$log" 2>/dev/null || true
    got=$(cat "$tmp/count" 2>/dev/null || echo 0)
    if [[ $rc != "$want" || $got != "$calls" ]]; then
        echo "FAIL $name: status $rc (want $want), rig/run.sh called $got times (want $calls)"
        sed "s/^/  | /" "$log" | tail -n 30
        bad=1
        return 0
    fi
    for t in "$@"; do
        if ! grep -qF -- "$t" "$log"; then
            echo "FAIL $name: the output lacks '$t'"
            sed "s/^/  | /" "$log" | tail -n 30
            bad=1
            return 0
        fi
    done
    echo "ok   $name: status $rc after $got attempt(s)"
}

scenario clean pass 0 1 'PASS  rig'
scenario triple-fault-then-pass tf,pass 0 2 'rig CI: RETRY 1 of 2:' 'NOTE  rig retried after emulator faults: vmm-status' 'rig CI: PASS'
scenario two-triple-faults-then-pass tf,tf,pass 0 3 'rig CI: RETRY 2 of 2:' 'rig CI: rig passed on retry 2' 'rig CI: PASS'
scenario three-triple-faults tf,tf,tf 1 3 'rig CI: RETRY 2 of 2:' '--- why: vmm-status (exit status 25)' 'rig CI: FAIL (first failed step: rig)'
scenario triple-fault-then-wrong-status tf,status,pass 1 2 'rig CI: RETRY 1 of 2:' 'RIG-FAIL step=vmm-status bhyve_c1.reboot' 'rig CI: FAIL (first failed step: rig)'
scenario wrong-status status,pass 1 1 '--- why: vmm-status (exit status 25)' 'RIG-FAIL step=vmm-status bhyve_c1.reboot' 'rig CI: FAIL (first failed step: rig)'
if grep -q "RETRY" "$tmp/wrong-status.log"; then
    echo "FAIL wrong-status: a failure that is not the emulator's was retried"
    bad=1
fi
exit "$bad"
