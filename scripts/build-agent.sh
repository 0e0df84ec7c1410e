#!/usr/bin/env bash
# Builds the guest agent as a static binary. It has its own target dir because its RUSTFLAGS
# differ from the host build's: sharing one would rebuild every dependency on each switch.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
CARGO_TARGET_DIR=target/agent RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --quiet --release -p microbox-agent --target x86_64-unknown-linux-gnu
echo "target/agent/x86_64-unknown-linux-gnu/release/microbox-agent"
