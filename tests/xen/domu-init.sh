#!/bin/sh
# /init of the Xen lane's PV domU (tools/xen-lane/build-domu.sh packs it
# with busybox, xen-blkfront.ko and xtool).  It cannot see dom0's files:
# what to do comes on the kernel command line (xl's extra=), what it saw
# goes to its console as "DOMU ..." lines, which dom0 reads from
# xenconsoled's log.  xt.blkfront=PARAM=VALUE,... are blkfront's module
# parameters.  Steps, each optional, in this order:
#   xt.md5=xvda,xvdb       md5sum of each whole disk
#   xt.plan=xvda:SEED,...  xtool apply (patterned O_DIRECT writes, a discard)
#   xt.ro=xvdc             xtool readonly (writes must fail)
#   xt.stream=xvda:SEED    xtool stream (until destroyed)
#   xt.bench=xvdb:LABEL,.. xtool bench on each disk, with persistent grants
#                          (blkfront's default), then again without
#                          (blkfront reloaded with feature_persistent=0);
#                          xt.secs=S each run, xt.rounds=N of each
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
arg() { sed -n "s/.*xt\.$1=\([^ ]*\).*/\1/p" /proc/cmdline | tr , ' '; }
say() { echo "DOMU $*"; }
MD5=$(arg md5) PLAN=$(arg plan) RO=$(arg ro) STREAM=$(arg stream)
BLKFRONT=$(arg blkfront)
BENCH=$(arg bench) SECONDS_EACH=$(arg secs) ROUNDS=$(arg rounds)

# wait_disks VDEV...: the block devices, each within 60 s of the last
# (dom0 may attach them one by one).
wait_disks() {
    for d in "$@"; do
        i=0
        while [ ! -b "/dev/$d" ] && [ $i -lt 600 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        [ -b "/dev/$d" ] || say "FAIL no /dev/$d"
    done
}
vdevs() { for x in "$@"; do echo "${x%%:*}"; done; }

# What blkfront negotiated with each backend (flush, persistent grants,
# indirect segments): "DOMU blkfront xvda: flush diskcache: ...".
features() {
    dmesg | sed -n 's/.*blkfront: \(xvd[a-z]*\): \(flush.*\)/\1: \2/p' |
        while read -r line; do say "blkfront $line"; done
}

insmod /lib/modules/xen-blkfront.ko $BLKFRONT
wait_disks $MD5 $(vdevs $PLAN) $RO $(vdevs $STREAM) $(vdevs $BENCH)
features

for d in $MD5; do
    say "md5 $d $(md5sum "/dev/$d" | cut -d' ' -f1)"
done
# run WHAT VDEV COMMAND...: "DOMU WHAT VDEV ok|FAIL output".
run() {
    what=$1 vdev=$2; shift 2
    if out=$("$@" 2>&1); then
        say "$what $vdev ok $out"
    else
        say "$what $vdev FAIL $out"
    fi
}
for x in $PLAN; do
    run plan "${x%%:*}" xtool apply "/dev/${x%%:*}" "${x#*:}"
done
for d in $RO; do
    run readonly "$d" xtool readonly "/dev/$d"
done
for x in $STREAM; do
    xtool stream "/dev/${x%%:*}" "${x#*:}" 2>&1 | sed 's/^/DOMU /'
done

# bench PERSISTENT: the four rows on every bench disk, ROUNDS times,
# the disks taking turns so that they share whatever else the machine
# does (dom0 reports the median of each).
bench() {
    for round in $(seq ${ROUNDS:-3}); do
        for row in "read 1048576 1" "write 1048576 1" "randread 4096 16" \
                   "randwrite 4096 16"; do
            for x in $BENCH; do
                out=$(xtool bench "/dev/${x%%:*}" $row "${SECONDS_EACH:-1}" 2>&1)
                say "bench ${x#*:} persistent=$1 $out"
            done
        done
    done
}
if [ -n "$BENCH" ]; then
    bench 1
    rmmod xen-blkfront
    dmesg -c >/dev/null
    insmod /lib/modules/xen-blkfront.ko feature_persistent=0
    wait_disks $(vdevs $BENCH)
    features
    bench 0
fi
say "done"
sync
poweroff -f
