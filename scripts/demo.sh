#!/usr/bin/env bash
# The main job, end to end: build a tiny busybox OCI image locally (no internet needed), serve it
# from a real registry on 127.0.0.1, and let microbox pull it, boot a microVM and run a command.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bin=target/release/microbox
[ -x "$bin" ] || cargo build --release --quiet -p microbox
export MICROBOX_AGENT="$(scripts/build-agent.sh)"

work=$(mktemp -d /tmp/microbox-demo.XXXXXX)
cleanup() { [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

scripts/make-busybox-image.sh "$work/layout" demo >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YML
version: 0.1
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
log: {level: error}
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 & reg_pid=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:demo" "docker://127.0.0.1:$port/demo/busybox:latest"

set -x
"$bin" run --rm "127.0.0.1:$port/demo/busybox:latest" -- sh -c 'echo "hello from $(hostname), kernel $(uname -r)"; cat /etc/os-release 2>/dev/null || true'
