#!/usr/bin/env bash
# Sets up (Debian packages, release build) and boots the demo guest through the exit pipeline:
# a test guest that greets over COM1 from ring 3, then one that posts 100000 port writes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p bhyve -p guests
dir=target/guests
target/release/mkguests "$dir" >/dev/null
bhyve=target/release/bhyve
echo "== $bhyve -l com1,stdio -o boot.kernel=$dir/hello.elf -o stats.print=true hello"
set +e
"$bhyve" -l com1,stdio -o boot.kernel="$dir/hello.elf" -o stats.print=true hello
echo "(exit status $? — 1 is the guest's debug-exit 0: success)"
echo
echo "== $bhyve -l com1,stdio -o test.devices=true -o boot.kernel=$dir/posted.elf -o boot.cmdline=n=100000 posted"
"$bhyve" -l com1,stdio -o test.devices=true -o boot.kernel="$dir/posted.elf" \
    -o boot.cmdline=n=100000 -o stats.print=true posted
echo "(exit status $?)"
