# multilayer test image, layer 2: deletions (whiteouts), modifications, type changes. $1 = rootfs.
set -eu
R="$1"
rm "$R/data/delete-me.txt"
rm -r "$R/data/gone-dir"
echo "keep, modified in layer 2" > "$R/data/keep.txt"
touch -d '2010-10-10 10:10:10' "$R/data/keep.txt"
chmod 0640 "$R/data/subdir/nested.txt"
rm "$R/swap/was-file"; mkdir "$R/swap/was-file"; echo now-dir > "$R/swap/was-file/content"
rm -r "$R/swap/was-dir"; echo "now a file" > "$R/swap/was-dir"
rm "$R/swap/was-link"; echo "now regular" > "$R/swap/was-link"
rm "$R/links/hard2"
echo layer2 > "$R/links/l2-target"; ln "$R/links/l2-target" "$R/links/l2-hard"
echo new > "$R/misc/added-in-2"; chmod 6755 "$R/misc/added-in-2"
