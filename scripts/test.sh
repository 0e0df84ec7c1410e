#!/usr/bin/env bash
# Sets up (idempotently) and runs every check and test: fmt, clippy, unit and integration tests.
# Integration tests boot real microVMs under QEMU (TCG where KVM is not usable) and pull from a
# real registry that the test harness starts on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/setup.sh --deps
scripts/build-agent.sh
log() { printf '\033[1mtest:\033[0m %s\n' "$*" >&2; }
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "cargo test"
# Test binaries share two cores; VM tests inside one binary run one at a time by their own lock.
cargo test --workspace -- --test-threads=2
