#!/usr/bin/env bash
# Installs, idempotently, everything microbox needs on a fresh Debian 12 machine (as root),
# then builds the workspace in release mode. Safe to run again: it skips what is present.
#   scripts/setup.sh            install + build
#   scripts/setup.sh --deps     install only
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

APT_PACKAGES=(
  qemu-system-x86          # the VMM (microvm machine type)
  linux-image-cloud-amd64  # the guest kernel (boots under TCG; virtio drivers as modules)
  docker-registry          # a real OCI registry for the tests (distribution 2.8)
  skopeo umoci             # build and push test images; baselines for benchmarks
  busybox-static           # the tiny demo/test image
  libseccomp-dev libcap-ng-dev  # to build virtiofsd
  protobuf-compiler        # protoc, for the agent's .proto files
  passt                    # user-mode networking
  prometheus               # promtool, to validate our metrics output
  debootstrap              # the ~100 MB Debian image of the pull benchmark
  ovmf                     # SEV-SNP launch-digest tests against sev-snp-measure use its OVMF
  build-essential pkg-config  # linking, and the cargo-installed helpers
  python3-pip
  cpio curl jq
  openssl                  # the test token server signs its registry tokens with it
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
cargo_tool() { # name version binary
  if ! command -v "$3" >/dev/null 2>&1; then
    log "cargo install --locked $1 $2"
    cargo install --locked --quiet "$1" --version "$2"
  fi
}
cargo_tool virtiofsd 1.14.0 virtiofsd
cargo_tool vhost-device-vsock 0.3.0 vhost-device-vsock

# A standard gRPC health client for the agent tests (grpc.health.v1), and AMD's reference
# SEV-SNP launch-digest tool that our measurement is tested against.
if ! python3 -c 'import grpc, grpc_health.v1' 2>/dev/null || ! command -v sev-snp-measure >/dev/null; then
  log "pip install grpcio grpcio-health-checking sev-snp-measure"
  pip_args=(--quiet --root-user-action=ignore grpcio grpcio-health-checking sev-snp-measure)
  # Debian's own python3 is "externally managed"; a pyenv or venv python is not.
  python3 -m pip install "${pip_args[@]}" 2>/dev/null \
    || python3 -m pip install --break-system-packages "${pip_args[@]}"
fi

[ "${1:-}" = "--deps" ] && exit 0
log "cargo build --release"
cargo build --release --workspace --quiet
