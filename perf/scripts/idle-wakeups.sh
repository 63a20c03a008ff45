#!/usr/bin/env bash
# Host wake-ups of an idle VM, per monitor thread: the `halt` test guest (it halts with interrupts
# off) under our bhyve with halt detection off, so the VM sits idle; each thread's voluntary
# context switches are read from /proc before and after SECONDS (default 5), then the VM is
# stopped with SIGTERM (its exit status 4 and how long the stop took are printed too).
#
#   perf/scripts/idle-wakeups.sh [SECONDS] [BHYVE]     (BHYVE: default the release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-5}
bhyve=${2:-target/release/bhyve}
case $secs in '' | *[!0-9]*) echo "idle-wakeups: SECONDS must be a whole number, not '$secs'" >&2; exit 2 ;; esac
if [ "$bhyve" = target/release/bhyve ]; then cargo build -q --release -p bhyve -p guests; fi
[ -x "$bhyve" ] || { echo "idle-wakeups: no bhyve at $bhyve" >&2; exit 2; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo run -q --release -p guests --bin mkguests -- "$dir/guests" >/dev/null
echo 'hw.vmm.halt_detection="0"' >"$dir/tunables"
"$bhyve" -c 1 -m 64M -l com1,stdio -o "boot.kernel=$dir/guests/halt.elf" \
    -o "vmm.tunables=$dir/tunables" -o "vmm.socket_dir=$dir" idle-wakeups >"$dir/out" 2>&1 &
pid=$!
snap() {
    for t in /proc/"$pid"/task/*; do
        printf '%s %s\n' "$(cat "$t/comm")" "$(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status")"
    done | sort
}
sleep 1
snap >"$dir/before"
sleep "$secs"
snap >"$dir/after"
t0=$(date +%s%N)
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
took=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "idle VM, $secs s: wake-ups per second, per thread"
join "$dir/before" "$dir/after" | awk -v s="$secs" '{ d = $3 - $2; tot += d; printf "  %-16s %7.1f\n", $1, d / s } END { printf "  %-16s %7.1f\n", "total", tot / s }'
echo "stopped by SIGTERM in $took ms, exit status $status (bhyve: 4 when stopped by a signal)"
