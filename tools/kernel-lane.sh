#!/bin/sh
# The kernel lane: boot Debian's stock kernel (it has NBD, device-mapper
# and partition parsers) under QEMU with virtme-ng, sharing this machine's
# root filesystem, and run the tests marked `kernel` inside it.
# KVM when /dev/kvm works, else TCG (about 20 s to boot).
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

# /tmp inside the guest is private, the work tree is shared: the exit
# status comes back through a file here (vng's own status is the VM's).
rc=$(mktemp -p "$PWD" .kernel-lane.XXXXXX)
trap 'rm -f "$rc"' EXIT
echo 99 > "$rc"
echo "kernel-lane: booting $kernel"
vng $kvm --run "$kernel" --memory 2G --cpus 2 --rwdir "$PWD" \
    --exec "cd '$PWD' && .venv/bin/python -m pytest -q -p no:cacheprovider \
            -m kernel ${NBDPLUG_LANE_TESTS:-tests} ; echo \$? > '$rc'" </dev/null
status=$(cat "$rc")
echo "kernel-lane: pytest exit status $status"
exit "$status"
