# Benchmark image: Debian bookworm minbase + python3-minimal, split into three layers
# (usr/lib, the rest of usr, everything else). $1 = debootstrapped rootfs, $2 = output dir.
set -eu
R="$1"; W="$2"
tar --numeric-owner --xattrs -C "$R" -cf "$W/l1.tar" usr/lib
tar --numeric-owner --xattrs -C "$R" --exclude=usr/lib -cf "$W/l2.tar" usr
(cd "$R" && ls -A | grep -vx usr | LC_ALL=C sort) > "$W/rest.list"
tar --numeric-owner --xattrs -C "$R" -cf "$W/l3.tar" -T "$W/rest.list"
