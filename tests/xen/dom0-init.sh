#!/bin/sh
# /init of the Xen lane's dom0 (tools/xen-lane/build-dom0.sh packs it):
# devices, the Xen modules, the host's root shared read-only over 9p at
# /host (with /proc, /sys, /dev, /run and /tmp bound into it, so that
# `chroot /host` runs the work tree's programs on dom0's devices and
# files), xenstored, xenconsoled; then the cases, read from the work tree
# (tests/xen/dom0-cases.sh), so that editing them needs no rebuild.
# Kernel arguments: xenlane.tree=PATH (the work tree on the host),
# xenlane.cases=WORDS (which cases; default all).
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Xen's locking.sh stats /dev/stdin; devtmpfs makes no /dev/fd links.
ln -s /proc/self/fd /dev/fd
ln -s fd/0 /dev/stdin; ln -s fd/1 /dev/stdout; ln -s fd/2 /dev/stderr
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs -o size=70% tmpfs /tmp
mkdir -p /run/xen /run/xenstored /run/xen-hotplug /run/lock /var/lib/xen \
    /var/lib/xenstored /var/log/xen/console

arg() { sed -n "s/.*xenlane\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
TREE=$(arg tree)
CASES=$(arg cases | tr + ' ')

end() {
    echo "XENLANE-END"
    sync
    poweroff -f
}

for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs loop nbd \
         dm-mod virtio_pci 9pnet_virtio 9p; do
    modprobe "$m" || echo "XENLANE-FATAL modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host ||
    { echo "XENLANE-FATAL no 9p share of the host"; end; }
for d in proc sys dev dev/pts run tmp; do mount --bind "/$d" "/host/$d"; done
# A work tree under /tmp or /run (a CI checkout) is hidden by those
# binds: its own share goes back where it was.
if [ ! -d "/host$TREE/tests/xen" ]; then
    mkdir -p "/host$TREE" &&
        mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose tree "/host$TREE" ||
        { echo "XENLANE-FATAL no 9p share of the work tree"; end; }
fi

xenstored --pid-file /run/xenstored.pid
for i in $(seq 100); do
    timeout 5 xenstore-exists /local 2>/dev/null && break
    sleep 0.1
done
timeout 60 xen-init-dom0 >/dev/null 2>&1 ||
    { echo "XENLANE-FATAL xen-init-dom0 failed"; end; }
timeout 60 xenconsoled --pid-file=/run/xenconsoled.pid --log=guest \
    --log-dir=/var/log/xen/console ||
    { echo "XENLANE-FATAL xenconsoled failed"; end; }
echo "XENLANE-DOM0-UP $(cut -d' ' -f1 /proc/uptime)"

TREE=$TREE CASES=$CASES sh "/host$TREE/tests/xen/dom0-cases.sh"
end
