# multilayer test image, layer 3, written as a raw tar (umoci repack never emits opaque
# whiteouts): /replaced becomes opaque, so only its new contents remain. $1 = staging dir, $2 = tar.
set -eu
S="$1"
mkdir -p "$S/replaced"
: > "$S/replaced/.wh..wh..opq"
echo fresh > "$S/replaced/fresh.txt"
touch -d '2020-02-02 02:02:02' "$S/replaced/fresh.txt" "$S/replaced/.wh..wh..opq" "$S/replaced"
tar --numeric-owner --owner=0 --group=0 -C "$S" -cf "$2" replaced
