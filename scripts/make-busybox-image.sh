#!/usr/bin/env bash
# make-busybox-image.sh LAYOUT_DIR TAG: an OCI image layout holding a busybox userland, built
# with umoci from Debian's busybox-static. Used by the demo; tests have their own harness.
set -euo pipefail
layout=$1 tag=${2:-latest}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
umoci init --layout "$layout" 2>/dev/null || true
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$tmp/b"
r="$tmp/b/rootfs"
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev,run,var/www}
cp /bin/busybox "$r/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n' > "$r/etc/passwd"
printf 'root:x:0:\napp:x:1000:\n' > "$r/etc/group"
printf 'NAME="microbox demo (busybox)"\n' > "$r/etc/os-release"
chmod 1777 "$r/tmp"
umoci repack --image "$layout:$tag" "$tmp/b"
umoci config --image "$layout:$tag" --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin --config.cmd sh --config.workingdir /
echo "$layout:$tag"
