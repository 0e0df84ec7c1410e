#!/usr/bin/env bash
# Boots the static microbox-agent as PID 1 in a real QEMU microvm (TCG) with a busybox root on
# virtio-fs, a read-only volume, user-mode networking and vhost-device-vsock, then runs the
# `vm_agent` test against it through the hybrid-vsock socket and powers the VM
# off with Shutdown. Every helper process is stopped on exit.
#   crates/agent/scripts/vm-smoke.sh            (from the workspace root)
#   crates/agent/scripts/vm-smoke.sh --bench    also runs the agent_rtt benchmark in the VM
# Needs: qemu-system-x86, linux-image-cloud-amd64, busybox-static, virtiofsd and
# vhost-device-vsock in PATH or ~/.cargo/bin, python3 grpcio (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PATH="$HOME/.cargo/bin:$PATH"
log() { printf 'vm-smoke: %s\n' "$*" >&2; }

KVER=$(ls /lib/modules | grep -m1 -- '-cloud-amd64$') || { log "no cloud kernel modules"; exit 1; }
KERNEL=/boot/vmlinuz-$KVER
WORK=$(mktemp -d /tmp/microbox-vm-smoke.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  # vhost-device-vsock ignores SIGTERM while waiting for a new VM.
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

log "building the static agent"
CARGO_TARGET_DIR=target/agent RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -q --release -p microbox-agent --target x86_64-unknown-linux-gnu
AGENT=target/agent/x86_64-unknown-linux-gnu/release/microbox-agent

# A persistent overlay upper (virtio-fs) unless SMOKE_TMPFS_UPPER=1.
if [ "${SMOKE_TMPFS_UPPER:-0}" = 1 ]; then UPPER_TAG=null; else UPPER_TAG='"upper"'; fi

# Initramfs: /init = agent, boot config, modules in dependency order.
mkdir -p "$WORK/initrd/etc/microbox" "$WORK/initrd/lib/modules" "$WORK/initrd/dev"
MODS=(drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_mmio
      net/vmw_vsock/vsock net/vmw_vsock/vmw_vsock_virtio_transport_common
      net/vmw_vsock/vmw_vsock_virtio_transport fs/fuse/fuse fs/fuse/virtiofs
      fs/overlayfs/overlay net/core/failover drivers/net/net_failover drivers/net/virtio_net)
LIST=""
for m in "${MODS[@]}"; do
  cp "/lib/modules/$KVER/kernel/$m.ko" "$WORK/initrd/lib/modules/"
  LIST="$LIST\"/lib/modules/$(basename "$m").ko\","
done
cat > "$WORK/initrd/etc/microbox/boot.json" <<JSON
{"hostname":"smokebox","modules":[${LIST%,}],"rootfs_tag":"rootfs","upper_tag":${UPPER_TAG},
 "volumes":[{"tag":"vol0","guest_path":"/mnt/data","read_only":true}],
 "network":{"interface":"eth0","address_cidr":"10.0.2.15/24","gateway":"10.0.2.2","dns":["10.0.2.3"]},
 "vsock_port":4088}
JSON
cp "$AGENT" "$WORK/initrd/init"
mknod "$WORK/initrd/dev/console" c 5 1
(cd "$WORK/initrd" && find . | cpio -o -H newc --quiet > "$WORK/initrd.cpio")

# Image root and a volume.
mkdir -p "$WORK/rootfs/bin" "$WORK/rootfs/etc" "$WORK/rootfs/tmp" "$WORK/vol" "$WORK/upper"
cp /bin/busybox "$WORK/rootfs/bin/"
for t in $(/bin/busybox --list); do [ "$t" = busybox ] || ln -sf busybox "$WORK/rootfs/bin/$t"; done
echo "root:x:0:0:root:/root:/bin/sh" > "$WORK/rootfs/etc/passwd"
echo "volume content" > "$WORK/vol/hello.txt"

virtiofsd --socket-path="$WORK/fs.sock" --shared-dir="$WORK/rootfs" --cache=${SMOKE_CACHE:-auto} >"$WORK/virtiofsd.log" 2>&1 &
PIDS+=($!)
virtiofsd --socket-path="$WORK/vol.sock" --shared-dir="$WORK/vol" --cache=auto >"$WORK/virtiofsd-vol.log" 2>&1 &
PIDS+=($!)
# overlayfs keeps whiteouts and opaque dirs in trusted.* xattrs on the upper: needs --xattr.
virtiofsd --socket-path="$WORK/upper.sock" --shared-dir="$WORK/upper" --cache=auto --xattr >"$WORK/virtiofsd-upper.log" 2>&1 &
PIDS+=($!)
vhost-device-vsock --vm "guest-cid=3,socket=$WORK/vhost.sock,uds-path=$WORK/vsock.sock" >"$WORK/vsock.log" 2>&1 &
PIDS+=($!)
for s in fs.sock vol.sock upper.sock vhost.sock; do
  for _ in $(seq 100); do [ -S "$WORK/$s" ] && break; sleep 0.05; done
done

KHZ=$(awk '/cpu MHz/{printf "%d", $4*1000; exit}' /proc/cpuinfo)
log "booting (TCG)"
qemu-system-x86_64 -M microvm,memory-backend=mem \
  -object memory-backend-memfd,id=mem,size=256M,share=on -m 256M -smp 1 -cpu max \
  -kernel "$KERNEL" -initrd "$WORK/initrd.cpio" \
  -append "console=ttyS0 tsc_early_khz=$KHZ panic=-1 ${SMOKE_QUIET-quiet} ${SMOKE_APPEND:-}" -nographic -no-reboot \
  -chardev "socket,id=fs0,path=$WORK/fs.sock" -device vhost-user-fs-device,chardev=fs0,tag=rootfs \
  -chardev "socket,id=fs1,path=$WORK/vol.sock" -device vhost-user-fs-device,chardev=fs1,tag=vol0 \
  -chardev "socket,id=fs2,path=$WORK/upper.sock" -device vhost-user-fs-device,chardev=fs2,tag=upper \
  -chardev "socket,id=vs0,path=$WORK/vhost.sock" -device vhost-user-vsock-device,chardev=vs0 \
  -netdev user,id=n0 -device virtio-net-device,netdev=n0 \
  >"$WORK/console.log" 2>&1 </dev/null &
QEMU=$!
PIDS+=($QEMU)

SCRIPT='set -e
test "$(cat /mnt/data/hello.txt)" = "volume content"
if touch /mnt/data/x 2>/dev/null; then echo "volume is writable"; exit 1; fi
test "$(hostname)" = smokebox
grep -q "nameserver 10.0.2.3" /etc/resolv.conf
ip addr show eth0 | grep -q "10.0.2.15/24"
ip route | grep -q "default via 10.0.2.2"
echo written > /etc/overlay-upper && test "$(cat /etc/overlay-upper)" = written
echo box checks ok'

status=0
if [ "${1:-}" = --bench ]; then
  MICROBOX_AGENT_TEST_VSOCK="$WORK/vsock.sock" cargo bench -q -p microbox-runtime --bench agent_rtt || status=$?
fi
MICROBOX_AGENT_TEST_VSOCK="$WORK/vsock.sock" MICROBOX_AGENT_TEST_SHUTDOWN=1 \
MICROBOX_AGENT_TEST_SCRIPT="$SCRIPT" \
  cargo test -q -p microbox-runtime --test vm_agent -- --nocapture || status=$?

# Shutdown must power the VM off by itself.
for _ in $(seq 100); do kill -0 "$QEMU" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$QEMU" 2>/dev/null; then log "VM did not power off after Shutdown"; status=1; fi
# The image root must not have been written through the overlay.
if [ -e "$WORK/rootfs/etc/overlay-upper" ]; then log "write leaked into the image lower dir"; status=1; fi
if [ "$UPPER_TAG" != null ] && [ ! -e "$WORK/upper/upper/etc/overlay-upper" ]; then
  log "the write did not persist in the virtio-fs upper dir"; status=1
fi
log "console:"; sed 's/^/  | /' "$WORK/console.log" | tail -"${SMOKE_CONSOLE_LINES:-15}" >&2
[ $status -eq 0 ] && log "PASS" || log "FAIL"
exit $status
