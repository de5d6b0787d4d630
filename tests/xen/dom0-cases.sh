#!/bin/sh
# The Xen lane's cases, run in dom0 by its /init (tests/xen/dom0-init.sh)
# with TREE (the work tree's path on the host, the same inside
# `chroot /host`) and CASES.  One "CASE name PASS|FAIL what" line per
# case; the host (tools/xen-lane.sh) counts them.
#
# Phase 1, tapbridge (xen-blkback not loaded: it would claim every vbd):
#   two domUs at once: A reads, writes and discards a raw, a qcow2 (over a
#   backing file), a VMDK and a VHD image and fails to write a read-only
#   one; B streams flushed writes to a qcow2 until `xl destroy`; then a
#   third domU boots on B's image and measures throughput through
#   tapbridge and QEMU's qdisk.
# Phase 2, kernel blkback: block-nbdplug for the four formats, and the
#   throughput through blkback on a loop device.
LANE=$TREE/build/xen-lane           # on the host (and in the chroot)
IMAGES=$LANE/images
KERNEL=/host/boot/vmlinuz-$(uname -r)
RAMDISK=/host$LANE/domu.cpio.gz
W=/tmp/xl                           # dom0's memory, seen in the chroot too
XTOOL="/host$LANE/xtool"
CONSOLE=/var/log/xen/console
mkdir -p $W
PASSED=0 FAILED=0

T() { echo "XENLANE-T $(cut -d' ' -f1 /proc/uptime) $*"; }
in_host() { chroot /host "$@"; }
pass() { echo "CASE $1 PASS ${2:-}"; }
fail() { echo "CASE $1 FAIL ${2:-}"; }
log_tail() { # FILE: the end of a log, for a failing case
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

# domu NAME EXTRA DISK...: write NAME's xl config and create it.
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
memory = 128
vcpus = 1
disk = [ $disks ]
on_poweroff = "destroy"
on_crash = "destroy"
EOF
    rm -f $CONSOLE/guest-$name.log
    timeout 120 xl create $W/$name.cfg > $W/$name.create.log 2>&1 || {
        cat $W/$name.create.log
        log_tail /var/log/xen/xen-hotplug.log
        log_tail $W/tapbridge.log
        return 1
    }
    T "$name created"
}
gone() { ! xl list "$1" >/dev/null 2>&1; }
# wait_domu NAME SECONDS: until it powered itself off; else destroy it.
wait_domu() {
    until_true "$2" gone "$1" && { T "$1 finished"; return 0; }
    echo "domU $1 did not finish in $2 s"
    log_tail $CONSOLE/guest-$1.log 30
    timeout 30 xl destroy "$1"
    return 1
}
# said NAME WORDS: the domU's console lines "DOMU WORDS ..." (rest of line).
said() {
    sed -n "s/^DOMU $2 //p" $CONSOLE/guest-$1.log 2>/dev/null | tr -d '\r'
}

# raw_md5 IMAGE OUT: qemu-img convert -O raw of IMAGE into OUT; its md5.
raw_md5() {
    in_host qemu-img convert -O raw "$1" "$2" && md5sum < "$2" | cut -d' ' -f1
}

# check_image FILE FMT: qemu-img check where it checks the format, else
# nbdplug check (qemu-img has no check for raw or vpc).
check_image() {
    case $2 in
    qcow2|vmdk) in_host qemu-img check -q -f "$2" "$1" ;;
    vpc) in_host "$TREE/.venv/bin/nbdplug" check -f vpc "$1" >/dev/null ;;
    raw) true ;;
    esac
}

# plan_case CASE DOMU VDEV IMAGE FMT SEED: the domU's md5 of the disk is
# that of qemu-img convert -O raw; after it wrote and discarded (xtool
# apply) and shut down, the image checks clean and reads back the plan.
plan_case() {
    c=$1 dom=$2 vdev=$3 img=$4 fmt=$5 seed=$6
    want=$(cat /host$IMAGES/${img##*/}.md5)
    got=$(said $dom "md5 $vdev")
    applied=$(said $dom "plan $vdev")
    if [ "$got" != "$want" ]; then
        fail $c "domU md5 '$got', qemu-img convert -O raw '$want'"
    elif [ "${applied%% *}" != ok ]; then
        fail $c "domU: $applied"
    elif ! out=$(check_image $img $fmt 2>&1); then
        fail $c "check: $(echo $out | tail -c 300)"
    elif ! in_host qemu-img convert -f $fmt -O raw $img $img.after ||
         ! out=$($XTOOL verify /host$IMAGES/${img##*/}.orig $img.after $seed); then
        fail $c "read back: $out"
    else
        pass $c "md5 ok; ${applied#ok }; check clean; $out"
    fi
    rm -f $img.after
}

# images NAME...: copy from the host into dom0's memory.  NAME.orig (its
# qemu-img convert -O raw) and NAME.md5 stay on the host (make-images.sh).
images() {
    for i in "$@"; do
        cp "/host$IMAGES/$i" $W/$i
    done
}

tapbridge_start() {
    in_host "$TREE/.venv/bin/tapbridge" serve-xen > $W/tapbridge.log 2>&1 &
    TAPBRIDGE=$!
    until_true 60 grep -q "watching" $W/tapbridge.log ||
        { echo "tapbridge did not start"; log_tail $W/tapbridge.log; return 1; }
    T "tapbridge up"
}

# The domain is gone for good: not even a dying domain kept alive by
# pages dom0 still maps, and no event channel of dom0 bound to it.
released() { # DOMID
    ! xl list | awk '{print $2}' | grep -qx "$1" &&
    ! lsevtchn 0 2>/dev/null | grep -q "Interdomain (Connected) - Remote Domain $1,"
}

phase_tapbridge() {
    images raw.img base.qcow2 qcow2.qcow2 vmdk.vmdk vhd.vhd ro.qcow2 stream.qcow2
    T "images ready"
    tapbridge_start || { fail tapbridge "did not start"; return; }
    base_md5=$(md5sum < $W/base.qcow2)
    tb="script=block-tapbridge"
    # B first: it writes until destroyed, while A runs.
    domu domu-b "xt.stream=xvda:0x5eed" \
        "vdev=xvda,access=rw,$tb,target=qcow2:$W/stream.qcow2" ||
        { fail two-domus "domu-b did not start"; return; }
    domu domu-a "xt.md5=xvda,xvdb,xvdc,xvdd,xvde xt.plan=xvda:11,xvdb:12,xvdc:13,xvdd:14 xt.ro=xvde" \
        "vdev=xvda,access=rw,$tb,target=raw:$W/raw.img" \
        "vdev=xvdb,access=rw,$tb,target=qcow2:$W/qcow2.qcow2" \
        "vdev=xvdc,access=rw,$tb,target=vmdk:$W/vmdk.vmdk" \
        "vdev=xvdd,access=rw,$tb,target=vhd:$W/vhd.vhd" \
        "vdev=xvde,access=ro,$tb,target=qcow2:$W/ro.qcow2" ||
        { fail two-domus "domu-a did not start"; timeout 30 xl destroy domu-b; return; }
    destroy_case
    wait_domu domu-a 300
    if [ "${BOTH:-}" = yes ]; then
        pass two-domus "domu-a and domu-b served at once (their cases follow)"
    else
        fail two-domus "domu-a and domu-b were not running together"
    fi
    plan_case tapbridge-raw domu-a xvda $W/raw.img raw 11
    plan_case tapbridge-qcow2-backing domu-a xvdb $W/qcow2.qcow2 qcow2 12
    [ "$(md5sum < $W/base.qcow2)" = "$base_md5" ] ||
        fail tapbridge-qcow2-backing "the backing file changed"
    plan_case tapbridge-vmdk domu-a xvdc $W/vmdk.vmdk vmdk 13
    plan_case tapbridge-vhd domu-a xvdd $W/vhd.vhd vpc 14
    ro=$(said domu-a "readonly xvde")
    ro_md5=$(cat /host$IMAGES/ro.qcow2.md5)
    if [ "$(said domu-a "md5 xvde")" = "$ro_md5" ] && [ "${ro%% *}" = ok ] &&
       [ "$(raw_md5 $W/ro.qcow2 $W/ro.after)" = "$ro_md5" ]; then
        pass tapbridge-readonly "${ro#ok }"
    else
        fail tapbridge-readonly "$ro"
    fi
}

# B streams; once it has flushed 48 blocks (3 MiB) it is destroyed.
destroy_case() {
    c=tapbridge-destroy
    domid=$(xl domid domu-b 2>/dev/null)
    flushed() { [ "$(said domu-b FLUSHED | tail -n 1)" -ge 48 ] 2>/dev/null; }
    if ! until_true 120 flushed; then
        fail $c "domu-b did not stream: $(said domu-b '' | tail -n 3)"
        timeout 30 xl destroy domu-b
        return
    fi
    # Both served at once, each its own image.
    [ "$(xl list | grep -c '^domu-[ab] ')" = 2 ] && BOTH=yes
    timeout 60 xl destroy domu-b
    n=$(said domu-b FLUSHED | tail -n 1)
    T "domu-b destroyed after $n flushed blocks"
    if ! until_true 30 released "$domid"; then
        fail $c "domain $domid not released: $(xl list | tail -n +2 | tr '\n' ';') $(lsevtchn 0 | grep "Domain $domid," | tr '\n' ';')"
    elif ! until_true 30 grep -q "vbd/$domid/51712: disconnected" $W/tapbridge.log; then
        fail $c "tapbridge did not disconnect"; log_tail $W/tapbridge.log
    elif ! out=$(check_image $W/stream.qcow2 qcow2 2>&1); then
        fail $c "qemu-img check: $out"
    elif ! in_host qemu-img convert -O raw $W/stream.qcow2 $W/stream.raw ||
         ! out=$($XTOOL streamed $W/stream.raw 0x5eed "$n"); then
        fail $c "$out"
    else
        pass $c "destroyed after $n flushed 64 KiB blocks; grants and event channels released; check clean; $out"
    fi
    md5sum < $W/stream.raw | cut -d' ' -f1 > $W/stream.qcow2.md5
    rm -f $W/stream.raw
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

echo "dom0: cases $CASES"
install_tree
phase_tapbridge
