#!/usr/bin/env bash
# Peer figures: QEMU with KVM boots the Linux test guest inside the rig's outer
# VM, -M pc and -M microvm. Same as `rig/run.sh --peer`; every run.sh option
# works here (e.g. --runs 5, --machines 'pc microvm,rtc=on').
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" --peer "$@"
