#!/usr/bin/env bash
# Installs what building and testing the monitor needs on a fresh Debian machine of our kind:
# the system assembler and linker (test guests are assembled from source), and cargo's components.
# Idempotent; installs only what is missing. Runs as root (apt-get) or with sudo.
set -euo pipefail

need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v ld >/dev/null 2>&1 || need+=(binutils)
command -v objcopy >/dev/null 2>&1 || need+=(binutils)
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]} from Debian's packages" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is missing: install Rust (rustup) first" >&2
    exit 1
fi
for comp in rustfmt clippy; do
    if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$comp" >/dev/null 2>&1 || {
            echo "setup: cargo $comp is missing and rustup could not add it" >&2
            exit 1
        }
    fi
done
if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing; guests cannot run on this host" >&2
fi
