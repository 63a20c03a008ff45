# shellcheck shell=sh
# Payload whose "VMM" ignores SIGTERM and never prints the marker (rig self-test
# of the harness's guest limit: SIGTERM at 5 s, SIGKILL at 15 s, exit 24).
# shellcheck source-path=SCRIPTDIR source=../../l1/harness.sh
. /rig/harness.sh
rig_guest_run hang 5 - sh -c 'trap "" TERM; while :; do sleep 1; done'
exit "$RIG_STATUS"
