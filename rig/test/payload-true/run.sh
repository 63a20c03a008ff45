# shellcheck shell=sh
# Payload that passes at once (rig self-test).
echo "RIG-RESULT selftest.payload=true"
exit 0
