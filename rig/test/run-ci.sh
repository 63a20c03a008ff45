#!/usr/bin/env bash
# CI entry for the emulated-SVM rig: a stock Debian kernel booted by our bhyve on real
# kvm_amd inside QEMU's TCG (scripts/test.sh runs it when it is executable).
#
#   rig/test/run-ci.sh [--out DIR] [--bhyve PATH] [--skip-selftest] [--compare]
#
# Steps, each timed and reported PASS / FAIL / SKIP:
#   host-tools   apt-get install what is missing: qemu-system-x86 (the outer VM), cpio,
#                kmod (depmod), lz4 (the ELF vmlinux inside the bzImage), e2fsprogs (the
#                guest's ext4 root image: mke2fs -d, e2fsck, debugfs); needs root then
#   outer-emulator  Debian backports' QEMU for the outer VM, downloaded into the cache and
#                extracted (not installed); the host's QEMU if that fails (a NOTE says so)
#   build        our bhyve, statically linked (L1 has no libc):
#                RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=target/static
#                cargo build --profile dist --target x86_64-unknown-linux-gnu -p bhyve
#                (--bhyve PATH: use that binary instead, no build)
#   rig          rig/run.sh --bhyve: bzImage with 1 and 2 vCPUs, quiet and not, power-off
#                (status 1) and reboot (status 0), the ELF vmlinux through PVH, the guest's
#                own dmesg (our 16550A, I/O APIC, clocksource, RTC, ACPI S5; no unexpected
#                warning), root file system on virtio-blk (ext4 mounted rw, a file written
#                and synced, its bytes found in the image on the host), pings both ways over
#                virtio-net and a tap, hostile inputs (status 4 and a reason), L1's log
#   selftest     rig/test/selftest.sh bhyve-marker-missing bhyve-rootfs-stale: the same rig
#                must FAIL (marker-missing) when the guest cannot reach its init, and
#                (rootfs-image) when the image does not hold what this run's guest should write
#   compare      only with --compare (or RIG_CI_COMPARE=1): ours and QEMU -M pc / -M microvm
#                side by side (figures, not a pass/fail bar; a run that breaks fails it)
#
# Environment: BHYVE_RS_CACHE (downloads and built archives, default <repo>/.cache),
# RIG_CI_L1_QEMU (the outer VM's emulator: backports, the default, or host, or a path),
# RIG_CI_L1_SMP (the outer VM's CPUs, default 1), RIG_CI_L1_APPEND (L1's extra kernel options,
# default init_on_free=1),
# RIG_CI_TARGET_DIR (default target/static), RIG_CI_GUEST_TIMEOUT (one inner VM, default
# 150 s), RIG_CI_TIMEOUT (the whole outer VM of the rig step, default 840 s), RIG_CI_STALL
# (console silence that counts as an L1 hang, default guest timeout + 40 s; the rig step is
# retried after such a hang or another failure only the emulator is known to cause, at most
# RIG_CI_RIG_RETRIES times (default 2), see emulator_fault()).
# Output: DIR (default .cache/rig/ci/DATE) holds STEP.log per step and each rig run's folder
# (results.txt, console.log, consoles/). Exit status 0 if every step passed, 1 if one
# failed (named on the last line, with the tail of its log), 2 usage.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"

out=
bhyve=
selftest=1
compare=${RIG_CI_COMPARE:-0}
while (($#)); do
    case $1 in
        --out) [[ $# -ge 2 ]] || { echo "run-ci: --out needs a folder" >&2; exit 2; }; out=$2; shift 2 ;;
        --bhyve) [[ $# -ge 2 ]] || { echo "run-ci: --bhyve needs a path" >&2; exit 2; }; bhyve=$2; shift 2 ;;
        --skip-selftest) selftest=0; shift ;;
        --compare) compare=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "run-ci: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
cache=${BHYVE_RS_CACHE:-$repo/.cache}
[[ -n $out ]] || out=$cache/rig/ci/$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
out=$(cd "$out" && pwd)
target=${RIG_CI_TARGET_DIR:-target/static}
guest_timeout=${RIG_CI_GUEST_TIMEOUT:-150}
outer_timeout=${RIG_CI_TIMEOUT:-840}
# Silence (no console output from the outer VM) that counts as an L1 hang: the harness's own
# per-guest timeout plus a margin, so a guest that merely hangs is reported by the harness.
stall=${RIG_CI_STALL:-$((guest_timeout + 40))}
# L1's kernel command line. init_on_free=1 zeroes pages as L1 frees them, so TCG drops the code
# it translated from an earlier inner guest's pages (rig/README.md, "Inner-guest triple faults").
l1_append=${RIG_CI_L1_APPEND-init_on_free=1}
# The outer VM: Debian backports' QEMU (fetched into the cache, not installed; the host's if that
# fails), with one CPU. QEMU's emulated SVM faulted with two (rig/README.md, "The outer VM").
l1_qemu=${RIG_CI_L1_QEMU:-backports}
[[ $l1_qemu != host ]] || l1_qemu=qemu-system-x86_64
l1_smp=${RIG_CI_L1_SMP:-1}

summary=()
failed=
retried=
retries=${RIG_CI_RIG_RETRIES:-2}
[[ $retries =~ ^[0-9]+$ ]] || { echo "run-ci: RIG_CI_RIG_RETRIES must be a whole number, not '$retries'" >&2; exit 2; }
t_all=$(date +%s)

# step NAME CMD...: run CMD, its output into NAME.log; record PASS/FAIL and the time.
step() {
    local name=$1 t0 rc
    shift
    printf '\n=== rig CI: %s\n' "$name"
    t0=$(date +%s)
    set +e
    "$@" >"$out/$name.log" 2>&1
    rc=$?
    set -e
    local took=$(($(date +%s) - t0))
    if [[ $rc == 0 ]]; then
        summary+=("PASS  $name (${took}s)")
        echo "rig CI: $name passed in ${took}s"
    else
        summary+=("FAIL  $name (${took}s, status $rc): see $out/$name.log")
        [[ -n $failed ]] || failed=$name
        echo "rig CI: $name FAILED (status $rc) after ${took}s; last 40 lines of $out/$name.log:"
        tail -n 40 "$out/$name.log" | awk '{ print "  | " $0 }'
    fi
    return "$rc"
}
skip() { summary+=("SKIP  $1 ($2)"); printf '\n=== rig CI: %s skipped: %s\n' "$1" "$2"; }

host_tools() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v depmod >/dev/null || [[ -x /usr/sbin/depmod || -x /sbin/depmod ]] || missing+=(kmod)
    command -v lz4 >/dev/null || missing+=(lz4)
    command -v mke2fs >/dev/null || [[ -x /usr/sbin/mke2fs || -x /sbin/mke2fs ]] || missing+=(e2fsprogs)
    for t in apt-get apt-cache dpkg-deb; do
        command -v "$t" >/dev/null || { echo "run-ci: $t is missing: the rig needs a Debian host"; return 1; }
    done
    if ((${#missing[@]} == 0)); then
        echo "run-ci: host tools present"
        return 0
    fi
    [[ $(id -u) == 0 ]] || { echo "run-ci: missing ${missing[*]}: run 'apt-get install ${missing[*]}' as root"; return 1; }
    echo "run-ci: installing ${missing[*]}"
    apt-get update -qq || { echo "run-ci: apt-get update failed"; return 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        { echo "run-ci: apt-get install ${missing[*]} failed"; return 1; }
}

# Step functions run with errexit off (step collects their status): every command that
# matters is checked.
build() {
    RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=$target \
        cargo build --profile dist --target x86_64-unknown-linux-gnu -p bhyve ||
        { echo "run-ci: cargo build failed"; return 1; }
    local bin=$target/x86_64-unknown-linux-gnu/dist/bhyve
    [[ -x $bin ]] || { echo "run-ci: the build left no $bin"; return 1; }
    if command -v file >/dev/null; then file -L "$bin"; fi
}

# The rig's results, the checks first, into the log and onto stdout.
show_results() { # RESULTS-FILE
    [[ -f $1 ]] || return 0
    grep -E '[.](exit|marker|guest_cpus|acpi_s5_poweroff|message|start_to_marker_s)=|[.]dmesg_|^l1[.]dmesg=|^rig[.]' "$1" || true
    grep -E '^bhyve_c1[.]rootfs[.](root|write|host_[a-z]+)=|^bhyve_c1[.]net[.](guest_net|guest_ping_[0-9]+|l1_ping|guest_pinged_by_l1)=' "$1" || true
}

# why_failed, emulator_fault
# shellcheck source-path=SCRIPTDIR source=../lib/ci.sh
. "$repo/rig/lib/ci.sh"

rig_once() { # OUT-DIR
    local rc=0
    rig/run.sh --bhyve "$bhyve" --guest-timeout "$guest_timeout" --timeout "$outer_timeout" \
        --stall "$stall" ${l1_append:+--l1-append "$l1_append"} --l1-qemu "$l1_qemu" --l1-smp "$l1_smp" --out "$1" || rc=$?
    echo "--- checks (from $1/results.txt)"
    show_results "$1/results.txt"
    [[ $rc == 0 ]] || why_failed "$1"
    return "$rc"
}

# The rig step runs again when, and only when, the attempt before failed in a way only the emulator
# is known to cause (emulator_fault), at most $retries more times (RIG_CI_RIG_RETRIES, default 2):
# each retry is announced, every attempt's folder is kept (rig/, rig-retry1/, rig-retry2/), the
# summary counts them, and the last attempt decides. Any other failure fails at once.
rig() {
    local rc=0 dir=$out/rig n=0 why
    rig_once "$dir" || rc=$?
    while [[ $rc != 0 ]] && ((n < retries)) && emulator_fault "$dir"; do
        n=$((n + 1))
        why=$(sed -n 's/^rig[.]failed_step=//p' "$dir/results.txt" | tail -n 1)
        echo "rig CI: RETRY $n of $retries: the attempt in $dir failed only in a way the emulator is known to cause"
        echo "rig CI: ($why; see rig/README.md, \"Retries\"); outer console tail:"
        tail -n 5 "$dir/console.log" 2>/dev/null | tr -d '\r' | cut -c1-160 | awk '{ print "  | " $0 }'
        retried+="${retried:+, }$why (kept in $dir)"
        dir=$out/rig-retry$n
        echo "rig CI: running the rig step again into $dir"
        rc=0
        rig_once "$dir" || rc=$?
    done
    if [[ $rc == 0 && $n -gt 0 ]]; then echo "rig CI: rig passed on retry $n"; fi
    return "$rc"
}

selftest_marker_missing() {
    local rc=0
    RIG_SELFTEST_KEEP=$out/selftest rig/test/selftest.sh --bhyve "$bhyve" bhyve-marker-missing bhyve-rootfs-stale || rc=$?
    echo "--- what the rig said when the guest could not reach its marker ($out/selftest/bhyve-marker-missing.err):"
    cat "$out/selftest/bhyve-marker-missing.err" 2>/dev/null || echo "(none)"
    echo "--- what the rig said when the guest wrote a stale file ($out/selftest/bhyve-rootfs-stale.err):"
    grep 'FAILED step=' "$out/selftest/bhyve-rootfs-stale.err" 2>/dev/null || echo "(none)"
    return "$rc"
}

compare_run() {
    local rc=0
    rig/run.sh --compare "$bhyve" --guest-timeout "$guest_timeout" --out "$out/compare" || rc=$?
    grep -E 'start_to_marker_s=min|[.]counted[.](exits|userspace_exits)=' "$out/compare/results.txt" || true
    return "$rc"
}

# Resolves "backports" to the extracted binary; falls back to the host's QEMU, and says so, when the
# download fails (a mirror's hiccup should not fail the rig).
outer_emulator() {
    local bin
    if [[ $l1_qemu == backports ]]; then
        if bin=$(bash -c '. rig/lib/common.sh && rig_backports_qemu'); then
            l1_qemu=$bin
        else
            echo "run-ci: Debian backports' QEMU could not be had: the outer VM runs under the host's"
            l1_qemu=qemu-system-x86_64
            outer_note="backports QEMU unavailable (see $out/outer-emulator.log): the host's QEMU ran the outer VM"
        fi
    fi
    echo "run-ci: outer VM: $("$l1_qemu" --version | head -n 1), $l1_smp CPU(s)"
    export RIG_L1_QEMU=$l1_qemu RIG_L1_SMP=$l1_smp # the selftest's outer VMs too
}

echo "rig CI: output in $out"
step host-tools host_tools || true
outer_note=
if [[ $failed != host-tools ]] && step outer-emulator outer_emulator; then
    [[ -z $outer_note ]] || summary+=("NOTE  $outer_note")
fi
if [[ -n $bhyve ]]; then
    skip build "--bhyve $bhyve given"
    bhyve=$(cd "$(dirname "$bhyve")" && pwd)/$(basename "$bhyve")
elif [[ $failed == host-tools ]]; then
    skip build "host tools missing"
elif step build build; then
    case $target in
        /*) bhyve=$target/x86_64-unknown-linux-gnu/dist/bhyve ;;
        *) bhyve=$repo/$target/x86_64-unknown-linux-gnu/dist/bhyve ;;
    esac
fi
if [[ -z $bhyve || ! -x $bhyve ]]; then
    skip rig "no bhyve binary"
    skip selftest "no bhyve binary"
else
    step rig rig || true
    [[ -z $retried ]] || summary+=("NOTE  rig retried after emulator faults: $retried")
    if [[ $selftest == 1 ]]; then step selftest selftest_marker_missing || true; else skip selftest "--skip-selftest"; fi
    if [[ $compare == 1 ]]; then step compare compare_run || true; else skip compare "figures only; --compare to run"; fi
fi

printf '\n=== rig CI summary (%ss in all; logs in %s)\n' "$(($(date +%s) - t_all))" "$out"
printf '  %s\n' "${summary[@]}"
if [[ -n $failed ]]; then
    if [[ $failed == rig ]]; then
        last=$out/rig
        for d in "$out"/rig-retry*; do [[ -d $d ]] && last=$d; done
        why_failed "$last"
    fi
    echo "rig CI: FAIL (first failed step: $failed)"
    exit 1
fi
echo "rig CI: PASS"
