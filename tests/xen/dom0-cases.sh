#!/bin/sh
# The Xen lane's cases, run in dom0 by its /init (tests/xen/dom0-init.sh)
# with TREE (the work tree's path on the host, the same inside
# `chroot /host`) and CASES (phases to run: tapbridge, blkback; default
# all).  One "CASE name PASS|FAIL what" line per case, and "BENCH" lines
# for the throughput table; the host (tools/xen-lane.sh) collects them.
#
# Phase tapbridge (xen-blkback not loaded: it would claim every vbd):
#   domU A reads, writes and discards a raw, a qcow2 (over a backing
#   file), a VMDK and a VHD image and cannot write a read-only one, while
#   domU B streams flushed writes to a qcow2 until `xl destroy`; then
#   domU C boots on B's image and measures throughput through tapbridge
#   and QEMU's qdisk on copies of one raw image.
# Phase blkback (xen-blkback loaded, tapbridge stopped): domU D reads,
#   writes and discards the four formats through block-nbdplug (kernel
#   NBD), and measures throughput through blkback on a loop device of
#   the same raw image.
LANE=$TREE/build/xen-lane           # on the host (and in the chroot)
IMAGES=$LANE/images
KERNEL=/host/boot/vmlinuz-$(uname -r)
RAMDISK=/host$LANE/domu.cpio.gz
W=/tmp/xl                           # dom0's memory, seen in the chroot too
XTOOL=/host$LANE/xtool
CONSOLE=/var/log/xen/console
BENCH=${BENCH:-xt.secs=0.8 xt.rounds=3}  # each throughput run, and rounds
mkdir -p $W

T() { echo "XENLANE-T $(cut -d' ' -f1 /proc/uptime) $*"; }
in_host() { chroot /host "$@"; }
pass() { echo "CASE $1 PASS ${2:-}"; }
fail() { echo "CASE $1 FAIL ${2:-}"; }
log_tail() { # FILE [LINES]: the end of a log, for a failing case
    [ -f "$1" ] && tail -n "${2:-15}" "$1" | sed "s|^|  ${1##*/}: |"
}

# until_true SECONDS COMMAND...: poll COMMAND every 0.2 s; false on timeout.
until_true() {
    limit=$(($1 * 5)); shift
    i=0
    while ! "$@"; do
        i=$((i + 1))
        [ $i -ge $limit ] && return 1
        sleep 0.2
    done
}

# The work tree's hotplug scripts where xl looks for them, and the
# commands they run, from the work tree.
install_tree() {
    cp /host$TREE/hotplug/xen/* /etc/xen/scripts/
    for c in nbdplug tapbridge; do
        printf '#!/bin/sh\nexec chroot /host %s "$@"\n' \
            "$TREE/.venv/bin/$c" > /usr/local/bin/$c
        chmod 755 /usr/local/bin/$c
    done
}

# images NAME...: copy from the host into dom0's memory.  NAME.orig (its
# qemu-img convert -O raw) and NAME.md5 stay on the host (make-images.sh).
images() {
    for i in "$@"; do
        cp "/host$IMAGES/$i" $W/$i
    done
}

# domu NAME EXTRA DISK...: write NAME's xl config and create it; EXTRA
# goes on its kernel command line (domu-init.sh reads it); VCPUS=N,
# MEMORY=MiB.
domu() {
    name=$1 extra=$2; shift 2
    disks=""
    for d in "$@"; do disks="$disks'$d', "; done
    cat > $W/$name.cfg <<EOF
name = "$name"
type = "pv"
kernel = "$KERNEL"
ramdisk = "$RAMDISK"
extra = "console=hvc0 quiet $extra"
memory = ${MEMORY:-128}
vcpus = ${VCPUS:-1}
disk = [ $disks ]
on_poweroff = "destroy"
on_crash = "destroy"
EOF
    unset VCPUS MEMORY
    rm -f $CONSOLE/guest-$name.log
    if ! timeout 120 xl create $W/$name.cfg > $W/$name.create.log 2>&1; then
        log_tail $W/$name.create.log
        log_tail /var/log/xen/xen-hotplug.log
        [ -f $W/tapbridge.log ] && log_tail $W/tapbridge.log
        return 1
    fi
    T "$name created"
}
gone() { ! xl list "$1" >/dev/null 2>&1; }
# guest_log NAME: the end of its console, once, for a failing case.
guest_log() {
    case " $SHOWN " in *" $1 "*) return ;; esac
    SHOWN="$SHOWN $1"
    log_tail $CONSOLE/guest-$1.log 40
}
# wait_domu NAME SECONDS: until it powered itself off; else destroy it.
wait_domu() {
    until_true "$2" gone "$1" && { T "$1 finished"; return 0; }
    echo "domU $1 did not finish in $2 s"
    log_tail $CONSOLE/guest-$1.log 30
    timeout 30 xl destroy "$1"
    return 1
}
# said NAME WORDS: the rest of the domU's console lines "DOMU WORDS ...".
said() {
    sed -n "s/^DOMU $2 //p" $CONSOLE/guest-$1.log 2>/dev/null | tr -d '\r'
}

# check_image FILE FMT: qemu-img check (it has no check for raw or vpc).
check_image() {
    case $2 in
    qcow2|vmdk) in_host qemu-img check -q -f "$2" "$1" ;;
    *) true ;;
    esac
}
checked() { case $1 in qcow2|vmdk) echo "qemu-img check clean" ;;
            *) echo "(qemu-img checks no $1)" ;; esac; }

# plan_case CASE DOMU VDEV IMAGE FMT SEED [PERSISTENT]: the domU's md5 of
# the disk is that of qemu-img convert -O raw; after it wrote and
# discarded (xtool apply) and shut down, the image checks clean and reads
# back the plan.  PERSISTENT=yes: blkfront must have said it uses
# persistent grants.
plan_case() {
    c=$1 dom=$2 vdev=$3 img=$4 fmt=$5 seed=$6
    src=${img##*/}
    src=/host$IMAGES/${src#nbd-}        # the image it is a copy of
    want=$(cat $src.md5)
    got=$(said $dom "md5 $vdev")
    applied=$(said $dom "plan $vdev")
    features=$(said $dom "blkfront $vdev:")
    if [ "$got" != "$want" ]; then
        fail $c "domU md5 '$got', qemu-img convert -O raw '$want'"
        guest_log $dom
    elif [ "${applied%% *}" != ok ]; then
        fail $c "domU: $applied"
    elif [ "${7:-}" = yes ] && ! echo "$features" | grep -q "persistent grants: enabled"; then
        fail $c "blkfront: $features"
    elif ! out=$(check_image $img $fmt 2>&1); then
        fail $c "qemu-img check: $(echo $out | tail -c 300)"
    elif ! in_host qemu-img convert -f $fmt -O raw $img $img.after ||
         ! out=$($XTOOL verify $src.orig $img.after $seed); then
        fail $c "read back: $out"
    else
        pass $c "md5 of /dev/$vdev = md5 of qemu-img convert; ${applied#ok }; $(checked $fmt); read back: $out"
    fi
    rm -f $img.after
}

# --- phase tapbridge ----------------------------------------------------------

# tapbridge_start; ...; tapbridge_up: the daemon, which takes seconds to
# start here (Python), meanwhile the caller does something else.
tapbridge_start() {
    # chroot itself in the background, so that $! is the daemon's pid.
    chroot /host "$TREE/.venv/bin/tapbridge" serve-xen \
        > $W/tapbridge.log 2>&1 &
    TAPBRIDGE=$!
}
tapbridge_up() {
    until_true 60 grep -q "watching" $W/tapbridge.log ||
        { log_tail $W/tapbridge.log; return 1; }
    T "tapbridge up"
}

# The domain is gone for good: no dying domain kept alive by pages dom0
# still maps, and no event channel of dom0 bound to it.
released() { # DOMID
    ! xl list | awk '{print $2}' | grep -qx "$1" &&
    ! lsevtchn 0 2>/dev/null |
        grep -q "Interdomain (Connected) - Remote Domain $1,"
}
# libxl saw the device close and removed it.
backend_gone() { ! xenstore-exists /local/domain/0/backend/vbd/$1; }
# Nothing of any guest left in the daemon: no gntdev or evtchn open.
daemon_clean() {
    ! ls -l /proc/$TAPBRIDGE/fd 2>/dev/null | grep -q "/dev/xen/" &&
    ! grep -q "/dev/xen/gntdev" /proc/$TAPBRIDGE/maps
}

phase_tapbridge() {
    tapbridge_start
    images raw.img base.qcow2 qcow2.qcow2 vmdk.vmdk vhd.vhd ro.qcow2 \
        stream.qcow2 bench.raw
    cp $W/bench.raw $W/bench-qdisk.raw
    T "images ready"
    tapbridge_up || { fail tapbridge-start "tapbridge did not start"; return; }
    base_md5=$(md5sum < $W/base.qcow2)
    tb="script=block-tapbridge"
    # A and B at once: B writes until destroyed, while A runs.
    domu domu-b "xt.stream=xvda:0x5eed" \
        "vdev=xvda,access=rw,$tb,target=qcow2:$W/stream.qcow2" &
    b=$!
    # A's blkfront asks for rings of 2 pages (its default is 1), and a
    # queue per vCPU; with persistent grants it keeps a page per segment
    # of every slot of every ring (8 MiB a ring here): memory for that.
    VCPUS=2 MEMORY=224 domu domu-a "xt.blkfront=max_ring_page_order=1 xt.md5=xvda,xvdb,xvdc,xvdd,xvde xt.plan=xvda:11,xvdb:12,xvdc:13,xvdd:14 xt.ro=xvde" \
        "vdev=xvda,access=rw,$tb,target=raw:$W/raw.img" \
        "vdev=xvdb,access=rw,$tb,target=qcow2:$W/qcow2.qcow2" \
        "vdev=xvdc,access=rw,$tb,target=vmdk:$W/vmdk.vmdk" \
        "vdev=xvdd,access=rw,$tb,target=vhd:$W/vhd.vhd" \
        "vdev=xvde,access=ro,$tb,target=qcow2:$W/ro.qcow2"
    a=$?
    if ! wait $b; then
        fail tapbridge-destroy "domu-b did not start"
        timeout 30 xl destroy domu-a
        return
    fi
    if [ $a != 0 ]; then
        fail tapbridge-formats "domu-a did not start"
        timeout 30 xl destroy domu-b
        return
    fi
    domid_a=$(xl domid domu-a)
    destroy_case
    wait_domu domu-a 300
    rings=$(grep -c "vbd/$domid_a/.*: connected .*, 2 queues of 2 ring pages" $W/tapbridge.log)
    if [ "$rings" = 5 ]; then
        pass tapbridge-rings "domu-a's 5 disks each with 2 queues (2 vCPUs) of 2-page rings (max_ring_page_order=1)"
    else
        fail tapbridge-rings "$rings of domu-a's 5 disks had 2 queues of 2 pages"
    fi
    if [ "${BOTH:-}" = yes ]; then
        pass tapbridge-two-domus "domu-a and domu-b served at once, each its image (cases above and below)"
    else
        fail tapbridge-two-domus "domu-a and domu-b were not running together"
    fi
    plan_case tapbridge-raw domu-a xvda $W/raw.img raw 11 yes
    plan_case tapbridge-qcow2-backing domu-a xvdb $W/qcow2.qcow2 qcow2 12 yes
    [ "$(md5sum < $W/base.qcow2)" = "$base_md5" ] ||
        fail tapbridge-qcow2-backing "the backing file changed"
    plan_case tapbridge-vmdk domu-a xvdc $W/vmdk.vmdk vmdk 13 yes
    plan_case tapbridge-vhd domu-a xvdd $W/vhd.vhd vpc 14 yes
    ro=$(said domu-a "readonly xvde")
    ro_md5=$(cat /host$IMAGES/ro.qcow2.md5)
    if [ "$(said domu-a "md5 xvde")" = "$ro_md5" ] && [ "${ro%% *}" = ok ] &&
       in_host qemu-img convert -O raw $W/ro.qcow2 $W/ro.after &&
       [ "$(md5sum < $W/ro.after | cut -d' ' -f1)" = "$ro_md5" ]; then
        pass tapbridge-readonly "md5 ok; ${ro#ok }; image unchanged"
    else
        fail tapbridge-readonly "$ro"
    fi
    rm -f $W/ro.after

    # C: a new domU on the destroyed one's image, then the throughput.
    domu domu-c "xt.md5=xvda xt.bench=xvdb:tapbridge,xvdc:qdisk $BENCH" \
        "vdev=xvda,access=rw,$tb,target=qcow2:$W/stream.qcow2" \
        "vdev=xvdb,access=rw,$tb,target=raw:$W/bench.raw" \
        "vdev=xvdc,access=rw,backendtype=qdisk,target=$W/bench-qdisk.raw" ||
        { fail tapbridge-reboot "domu-c did not start"; return; }
    wait_domu domu-c 300
    got=$(said domu-c "md5 xvda")
    if [ -n "$got" ] && [ "$got" = "$(cat $W/stream.qcow2.md5 2>/dev/null)" ]; then
        pass tapbridge-reboot "a new domU booted on the destroyed domU's image and read what dom0 reads"
    else
        fail tapbridge-reboot "domU md5 '$got', dom0 '$(cat $W/stream.qcow2.md5 2>/dev/null)'"
    fi
    said domu-c bench | sed 's/^/BENCH /'
    said domu-c blkfront | sed 's/^/  domu-c blkfront /'

    # Every guest gone: nothing left mapped or bound, the daemon stops.
    if until_true 30 daemon_clean; then
        pass tapbridge-released "$(grep -c 'disconnected' $W/tapbridge.log) rings closed; $(sed -n 's/.*disconnected, \([0-9]*\) persistent.*/\1/p' $W/tapbridge.log | awk '{n+=$1} END {print n+0}') persistent grants unmapped; no gntdev mapping or Xen device left open"
    else
        fail tapbridge-released "$(ls -l /proc/$TAPBRIDGE/fd | grep xen | wc -l) Xen devices open, $(grep -c gntdev /proc/$TAPBRIDGE/maps) gntdev mappings"
    fi
    kill $TAPBRIDGE
    timeout 30 sh -c "while [ -d /proc/$TAPBRIDGE ]; do sleep 0.2; done"
    grep -q Traceback $W/tapbridge.log &&
        { fail tapbridge-log "a traceback"; log_tail $W/tapbridge.log 40; }
}

# B streams; once it has flushed 48 blocks (3 MiB) while A runs, it is
# destroyed.
destroy_case() {
    c=tapbridge-destroy
    domid=$(xl domid domu-b 2>/dev/null)
    flushed() { [ "$(said domu-b FLUSHED | tail -n 1)" -ge 48 ] 2>/dev/null; }
    if ! until_true 120 flushed; then
        fail $c "domu-b did not stream: $(said domu-b '' | tail -n 3)"
        timeout 30 xl destroy domu-b
        return
    fi
    [ "$(xl list | grep -c '^domu-[ab] ')" = 2 ] && BOTH=yes
    timeout 60 xl destroy domu-b
    n=$(said domu-b FLUSHED | tail -n 1)
    T "domu-b destroyed after $n flushed writes"
    if ! until_true 30 released "$domid"; then
        fail $c "domain $domid not released: $(xl list | tail -n +2 | tr '\n' ';') $(lsevtchn 0 | grep "Domain $domid," | tr '\n' ';')"
    elif ! until_true 30 grep -q "vbd/$domid/51712: disconnected" $W/tapbridge.log; then
        fail $c "tapbridge did not disconnect"; log_tail $W/tapbridge.log
    elif ! until_true 30 backend_gone $domid; then
        fail $c "libxl did not remove the backend: $(xenstore-ls /local/domain/0/backend/vbd/$domid | tr '\n' ';')"
    elif ! out=$(check_image $W/stream.qcow2 qcow2 2>&1); then
        fail $c "qemu-img check: $out"
    elif ! in_host qemu-img convert -O raw $W/stream.qcow2 $W/stream.raw ||
         ! out=$($XTOOL streamed $W/stream.raw 0x5eed "$n"); then
        fail $c "$out"
    else
        pass $c "xl destroy after $n flushed 64 KiB writes; domain gone (no page or event channel held), backend closed and removed, $(sed -n "s|.*vbd/$domid/51712: disconnected, ||p" $W/tapbridge.log); qemu-img check clean; $out"
    fi
    md5sum < $W/stream.raw | cut -d' ' -f1 > $W/stream.qcow2.md5
    rm -f $W/stream.raw
}

# --- phase blkback ------------------------------------------------------------

phase_blkback() {
    # Read nbdplug's and nbdkit's files over 9p once, before the first
    # block-nbdplug add must finish within libxl's 40 s.
    { in_host "$TREE/.venv/bin/nbdplug" list
      in_host nbdkit python --dump-plugin; } >/dev/null 2>&1 &
    warm=$!
    for i in raw.img qcow2.qcow2 vmdk.vmdk vhd.vhd; do
        cp /host$IMAGES/$i $W/nbd-$i
    done
    [ -f $W/base.qcow2 ] || cp /host$IMAGES/base.qcow2 $W/
    # The qcow2 overlay names its backing file relative to itself.
    [ -f $W/bench.raw ] || cp /host$IMAGES/bench.raw $W/
    modprobe xen-blkback || { fail blkback "no xen-blkback"; return; }
    wait $warm
    loop=$(losetup -f)
    losetup $loop $W/bench.raw
    nb="backendtype=phy,script=block-nbdplug"
    # Each block-nbdplug add starts nbdplug and nbdkit (Python, seconds
    # each here): one at a time, within libxl's 40 s, the first with the
    # domU and the others attached to it while it waits for them.
    domu domu-d "xt.md5=xvda,xvdb,xvdc,xvdd xt.plan=xvda:21,xvdb:22,xvdc:23,xvdd:24 xt.bench=xvde:blkback $BENCH" \
        "vdev=xvda,access=rw,$nb,target=raw:$W/nbd-raw.img" \
        "phy:$loop,xvde,w" ||
        { fail block-nbdplug "domu-d did not start"; losetup -d $loop; return; }
    for x in xvdb:qcow2:qcow2.qcow2 xvdc:vmdk:vmdk.vmdk xvdd:vhd:vhd.vhd; do
        set -- $(echo $x | tr : ' ')
        # Once more if libxl's 40 s for the script ran out (a loaded
        # host under TCG); its remove undid the first try.
        for try in 1 2; do
            timeout 60 xl block-attach domu-d \
                "vdev=$1,access=rw,$nb,target=$2:$W/nbd-$3" && break
            echo "  xl block-attach $1 failed (try $try)"
        done
        T "block-nbdplug $2 attached"
    done
    # Where dom0 has NBD and device-mapper, blkback gets the fast device.
    vias=$(in_host "$TREE/.venv/bin/nbdplug" list 2>&1 |
           grep -o 'via=[a-z]*' | sort | uniq -c | tr -s ' ' | paste -sd, -)
    wait_domu domu-d 300
    losetup -d $loop
    case "$vias" in
    " 4 via=fast") pass block-nbdplug-fast "blkback over the 4 fast devices (dm-linear to loop and NBD)" ;;
    *) fail block-nbdplug-fast "devices attached:${vias:- none}" ;;
    esac
    # xl runs block-nbdplug remove once the domain is gone: every device
    # detached again, and nbdkit no longer holds the images.
    attached() { in_host "$TREE/.venv/bin/nbdplug" list 2>&1 | grep -c /dev/; }
    detached() { [ "$(attached)" = 0 ]; }
    until_true 120 detached
    attached=$(attached)
    T "block-nbdplug devices detached"
    for x in raw.img:raw:xvda:21 qcow2.qcow2:qcow2:xvdb:22 \
             vmdk.vmdk:vmdk:xvdc:23 vhd.vhd:vpc:xvdd:24; do
        set -- $(echo $x | tr : ' ')
        plan_case block-nbdplug-$2 domu-d $3 $W/nbd-$1 $2 $4
    done
    if [ "$attached" = 0 ]; then
        pass block-nbdplug-detach "xl's block-nbdplug remove detached every device"
    else
        fail block-nbdplug-detach "$attached devices still attached"
    fi
    said domu-d bench | sed 's/^/BENCH /'
    said domu-d blkfront | sed 's/^/  domu-d blkfront /'
}

# Throughput only (for working on it): tapbridge and qdisk.
phase_bench() {
    tapbridge_start
    images bench.raw
    cp $W/bench.raw $W/bench-qdisk.raw
    tapbridge_up || { fail bench "tapbridge did not start"; return; }
    domu domu-c "xt.bench=xvdb:tapbridge,xvdc:qdisk $BENCH" \
        "vdev=xvdb,access=rw,script=block-tapbridge,target=raw:$W/bench.raw" \
        "vdev=xvdc,access=rw,backendtype=qdisk,target=$W/bench-qdisk.raw" ||
        { fail bench "domu-c did not start"; return; }
    wait_domu domu-c 300
    said domu-c bench | sed 's/^/BENCH /'
    said domu-c blkfront | sed 's/^/  domu-c blkfront /'
    kill $TAPBRIDGE
    pass bench "throughput measured"
}

echo "dom0: cases ${CASES:-all}"
install_tree
for phase in ${CASES:-all}; do
    case $phase in
    all) phase_tapbridge; phase_blkback ;;
    tapbridge|blkback|bench) phase_$phase ;;
    *) fail "$phase" "no such phase" ;;
    esac
done
