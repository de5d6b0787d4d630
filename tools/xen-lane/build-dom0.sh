#!/bin/bash
# build-dom0.sh DIR: the dom0 initramfs DIR/dom0.cpio.gz: busybox, the Xen
# 4.17 tools unpacked by fetch.sh (xl, xenstored, xenconsoled,
# xen-init-dom0, QEMU for qdisk), the host's xenstore-* clients, bash and
# flock for Xen's hotplug scripts, and the kernel modules dom0 loads,
# with a real modules.dep so that busybox modprobe works.  Libraries come
# from ldd.  Everything else (tapbridge, nbdplug, qemu-img, the cases)
# dom0 reads from the work tree, shared read-only over 9p.
#
# Rebuilt only when what goes in changes: the debs, the kernel, the host
# packages copied, this script or tests/xen/dom0-init.sh.
set -euo pipefail
DIR=$(cd "$1" && pwd)
TREE=$(cd "$(dirname "$0")/../.." && pwd)
KVER=${KVER:-$(ls /lib/modules | grep amd64 | sort -V | tail -n 1)}
X=$DIR/x
XBIN=/usr/lib/xen-4.17/bin
OUT=$DIR/dom0.cpio.gz

key=$({ cat "$DIR/x.key"; echo "$KVER"
        dpkg-query -W busybox-static bash util-linux xenstore-utils libc6
        cat "$0" "$TREE/tests/xen/dom0-init.sh"; } | md5sum | cut -c1-12)
[ -s "$OUT" ] && [ "$(cat "$OUT.key" 2>/dev/null)" = "$key" ] && exit 0

R=$DIR/dom0root
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,host,usr/bin,usr/local/bin}
mkdir -p "$R/lib/modules/$KVER" "$R/var"
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do
    [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"
done
ln -s ../run "$R/var/run"
ln -s ../run/lock "$R/var/lock"

# copy FILE [DEST]: FILE and the libraries ldd finds for it (the unpacked
# debs' own libraries first).
copy() {
    local f=$1 dest=${2:-$1} libs
    mkdir -p "$R$(dirname "$dest")"
    cp -L "$f" "$R$dest"
    libs=$(LD_LIBRARY_PATH=$X/usr/lib/x86_64-linux-gnu ldd "$f" 2>/dev/null)
    if printf '%s\n' "$libs" | grep -q 'not found'; then
        echo "build-dom0: libraries missing for $f:" >&2
        printf '%s\n' "$libs" | grep 'not found' >&2
        exit 1
    fi
    printf '%s\n' "$libs" | awk '/=> \//{print $3} /^[ \t]*\/lib64\//{print $1}' |
    while read -r lib; do
        case $lib in
        /lib64/*) mkdir -p "$R/lib64"; cp -L "$lib" "$R/lib64/" ;;
        *) mkdir -p "$R/lib/x86_64-linux-gnu"
           cp -L "$lib" "$R/lib/x86_64-linux-gnu/" ;;
        esac
    done
}

# Modules: Xen's devices, loop (blkback's phy: files), nbd and dm-mod
# (block-nbdplug's fast device), blkback itself (loaded only for the cases that want it) and 9p over
# virtio for the share.
for m in drivers/xen/xen-evtchn drivers/xen/xen-gntdev \
         drivers/xen/xen-gntalloc drivers/xen/xen-privcmd \
         drivers/xen/xenfs/xenfs drivers/block/xen-blkback/xen-blkback \
         drivers/block/loop drivers/block/nbd drivers/md/dm-mod \
         drivers/virtio/virtio drivers/virtio/virtio_ring \
         drivers/virtio/virtio_pci drivers/virtio/virtio_pci_legacy_dev \
         drivers/virtio/virtio_pci_modern_dev net/9p/9pnet \
         net/9p/9pnet_virtio fs/9p/9p fs/fscache/fscache fs/netfs/netfs; do
    mkdir -p "$R/lib/modules/$KVER/kernel/$(dirname $m)"
    cp "/lib/modules/$KVER/kernel/$m.ko" "$R/lib/modules/$KVER/kernel/$m.ko"
done
cp /lib/modules/"$KVER"/modules.{order,builtin,builtin.modinfo} \
    "$R/lib/modules/$KVER/"
depmod -b "$R" "$KVER"

for b in xl xenstored xenconsoled xenconsole xen-init-dom0 lsevtchn \
         libxl-save-helper; do
    copy "$X$XBIN/$b" "$XBIN/$b"
done
# libxl starts QEMU for qdisk disks from this path; it loads a keymap even
# with -vnc none.
copy "$X/usr/libexec/xen-qemu-system-i386" /usr/libexec/xen-qemu-system-i386
mkdir -p "$R/usr/share/qemu/keymaps"
cp /usr/share/qemu/keymaps/en-us "$R/usr/share/qemu/keymaps/"
copy /usr/bin/xenstore
for b in read write list exists rm ls chmod watch; do
    ln -sf xenstore "$R/usr/bin/xenstore-$b"
done
copy /usr/bin/flock                 # Xen's locking.sh; busybox has none
copy /bin/bash /bin/bash.real       # Xen's hotplug scripts are bash
ln -sf bash.real "$R/bin/bash"
# glibc dlopens libgcc_s for pthread_cancel (xl).
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$R/lib/x86_64-linux-gnu/"

mkdir -p "$R/etc/xen"
cp -a "$X/etc/xen/scripts" "$R/etc/xen/"
printf 'autoballoon="off"\nrun_hotplug_scripts=1\n' > "$R/etc/xen/xl.conf"
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
printf '/lib/x86_64-linux-gnu\n' > "$R/etc/ld.so.conf"
ldconfig -r "$R"
install -m 755 "$TREE/tests/xen/dom0-init.sh" "$R/init"

(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$key" > "$OUT.key"
rm -rf "$R"
