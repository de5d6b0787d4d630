#!/bin/sh
# The kernel lane: boot Debian's stock kernel (it has NBD, device-mapper
# and partition parsers) under QEMU with virtme-ng, sharing this machine's
# root filesystem, and run the tests marked `kernel` inside it, all in one
# boot and one pytest run.  KVM when asked for (NBDPLUG_LANE_KVM=1) and
# /dev/kvm works, else TCG: every Python start costs seconds there, so
# only the test files that hold kernel tests are collected.
set -eu
cd "$(dirname "$0")/.."
PATH="$PWD/.venv/bin:$PATH"

kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
if [ -z "$kernel" ]; then
    echo "kernel-lane: no kernel in /boot (make setup installs linux-image-amd64)" >&2
    exit 1
fi
kvm=--disable-kvm
if [ -w /dev/kvm ] && [ "${NBDPLUG_LANE_KVM:-0}" = 1 ]; then
    kvm=
fi
tests=${NBDPLUG_LANE_TESTS:-$(grep -l "mark\.kernel" tests/test_*.py)}

# /tmp inside the guest is private; the work tree is shared, so the
# kernel's log of a failed run is left in it, for reading afterwards.
mkdir -p build
log=build/kernel-lane-dmesg.txt
rm -f "$log"
rcfile=$(mktemp -p build kernel-lane.XXXXXX)
trap 'rm -f "$rcfile"' EXIT
echo 0 > "$rcfile"
start=$(date +%s)
echo "kernel-lane: booting $kernel"
# Through a pipe: QEMU reopens its stdout and stderr by path, and on a
# regular file it would truncate what is already there.
{ vng $kvm --run "$kernel" --memory 2G --cpus 2 --rwdir "$PWD" --exec "
    cd '$PWD' && .venv/bin/python -m pytest -p no:cacheprovider -v \
        --durations=5 -m kernel $(echo $tests) || { s=\$?; dmesg > $log; exit \$s; }
    " </dev/null || echo $? > "$rcfile"; } 2>&1 | cat
status=$(cat "$rcfile")
echo "kernel-lane: exit status $status after $(( $(date +%s) - start )) s"
[ "$status" = 0 ] || [ ! -f "$log" ] || echo "kernel-lane: the guest's dmesg is in $log"
exit "$status"
