#!/bin/sh
# build-domu.sh DIR: the domU initramfs DIR/domu.cpio.gz (busybox,
# xen-blkfront.ko, tests/xen/domu-init.sh as /init) and DIR/xtool, the
# static disk tool it and dom0 both run.  Small: rebuilt when its inputs
# change.
set -eu
DIR=$(cd "$1" && pwd)
TREE=$(cd "$(dirname "$0")/../.." && pwd)
KVER=${KVER:-$(ls /lib/modules | grep amd64 | sort -V | tail -n 1)}
OUT=$DIR/domu.cpio.gz

key=$({ echo "$KVER"; dpkg-query -W busybox-static libc6 gcc
        cat "$0" "$TREE/tests/xen/domu-init.sh" "$TREE/tests/xen/xtool.c"
      } | md5sum | cut -c1-12)
[ -s "$OUT" ] && [ "$(cat "$OUT.key" 2>/dev/null)" = "$key" ] && exit 0

gcc -O2 -Wall -Werror -static -o "$DIR/xtool" "$TREE/tests/xen/xtool.c"
R=$DIR/domuroot
rm -rf "$R"
mkdir -p "$R"/bin "$R"/proc "$R"/sys "$R"/dev "$R"/lib/modules
cp /bin/busybox "$R/bin/"
for a in $(/bin/busybox --list); do
    [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"
done
cp "$DIR/xtool" "$R/bin/"
cp "/lib/modules/$KVER/kernel/drivers/block/xen-blkfront.ko" "$R/lib/modules/"
install -m 755 "$TREE/tests/xen/domu-init.sh" "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$key" > "$OUT.key"
rm -rf "$R"
