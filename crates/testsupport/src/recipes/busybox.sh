# busybox test image, single layer. $1 = rootfs, $ROOTLESS=1 skips chown.
set -eu
R="$1"
mkdir -p "$R/bin" "$R/sbin" "$R/etc" "$R/tmp" "$R/root" "$R/home/app" "$R/proc" "$R/sys" "$R/dev" "$R/run" "$R/var/www" "$R/usr/bin"
cp /bin/busybox "$R/bin/busybox"
chmod 0755 "$R/bin/busybox"
for a in sh ash ls cat echo uname true false env id sleep sync mkdir rm rmdir sha256sum md5sum dd head tail wc \
         hostname mount umount ps httpd nc wget grep sed awk cp mv ln chmod chown touch stat find xargs \
         date df du free kill printf test seq sort uniq tr cut tee yes vi ip ifconfig ping route nslookup \
         whoami basename dirname readlink realpath pwd dmesg top uptime tar gzip gunzip mknod mkfifo \
         truncate cmp diff expr; do
  ln -s busybox "$R/bin/$a"
done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$R/etc/passwd"
printf 'root:x:0:\napp:x:1000:\nnogroup:x:65534:\n' > "$R/etc/group"
echo microbox-test > "$R/etc/hostname"
echo '<h1>microbox busybox test image</h1>' > "$R/var/www/index.html"
chmod 1777 "$R/tmp"
chmod 0700 "$R/root"
if [ "${ROOTLESS:-0}" != 1 ]; then chown 1000:1000 "$R/home/app"; fi
