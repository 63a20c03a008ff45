#!/usr/bin/env bash
# The whole test suite, tier by tier. `.ci/run` calls exactly this.
#   1. format and lints          cargo fmt --check, cargo clippy --all-targets -D warnings
#   2. unit + KVM + guest tests  cargo test --workspace (guest tests need /dev/kvm)
#   3. release-only tests        the two-process ring test moves 10 million records
#   4. loom models               RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release, and the
#                                check that a deliberately broken ordering fails a model
#   5. the emulated-SVM rig      rig/test/ci-lib.sh, ci-retry.sh (the CI's triage of rig failures), then a
#                                stock Debian kernel under real kvm_amd (RIG=0 skips that)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

step() { printf '\n=== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "tests (unit, KVM integration, test guests)"
cargo test --workspace

step "release-only tests (two-process ring, 10M records)"
cargo test --release -p pipeline --test two_process

step "loom models"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p loom-tests --release

step "loom catches a deliberately broken ordering (a Relaxed publish where Release is needed)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p loom-tests --release --features broken-ordering --test broken_ordering

step "the rig CI's failure triage (which failures it retries), on made-up run folders and a stand-in rig"
rig/test/ci-lib.sh
rig/test/ci-retry.sh

if [ "${RIG:-1}" != 0 ] && [ -x rig/test/run-ci.sh ]; then
    step "emulated-SVM rig (stock Linux on kvm_amd inside TCG)"
    rig/test/run-ci.sh
fi
echo
echo "all tests passed"
