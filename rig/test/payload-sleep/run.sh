# shellcheck shell=sh
# Payload that never finishes in time (rig self-test of the outer limit).
echo "RIG-RESULT selftest.payload=sleep"
sleep 600
