#!/bin/sh
# The Xen lane: a real Xen 4.17 (Debian 12's packages) with a Debian dom0
# under QEMU (TCG), where tapbridge, block-nbdplug, kernel blkback and
# QEMU's qdisk serve real PV domUs (Linux blkfront).  Everything it makes
# is under build/xen-lane (tools/xen-lane/*.sh say how); the work tree is
# shared into dom0 read-only over 9p, and dom0 runs tests/xen/dom0-cases.sh
# from it.  Prints one line per case and "xen-lane: N passed, N failed";
# exits non-zero on any failure, hang or timeout.
#
#   XEN_LANE_CASES   which cases (default all)
#   XEN_LANE_TIMEOUT seconds for the boot and every case (default 1200:
#   about 300 on a quiet 2-CPU machine, twice that and more under load)
set -eu
cd "$(dirname "$0")/.."
TREE=$PWD
B=$TREE/build/xen-lane
mkdir -p "$B"
timeout=${XEN_LANE_TIMEOUT:-1200}
kver=$(ls /lib/modules | grep amd64 | sort -V | tail -n 1)
start=$(date +%s)

step() { # WHAT SECONDS COMMAND...
    what=$1 secs=$2; shift 2
    if ! timeout "$secs" "$@"; then
        echo "xen-lane: $what failed"
        echo "xen-lane: 0 passed, 1 failed"
        exit 1
    fi
}
step "fetching the Xen packages" 600 tools/xen-lane/fetch.sh "$B"
step "building dom0" 300 env KVER="$kver" tools/xen-lane/build-dom0.sh "$B"
step "building the domU" 120 env KVER="$kver" tools/xen-lane/build-domu.sh "$B"
step "making the images" 120 tests/xen/make-images.sh "$B/images"
# dom0 reads the tree read-only: bytecode compiled here saves it the work.
step "compiling bytecode" 120 .venv/bin/python -m compileall -q nbdplug \
    tapbridge hotplug dm
echo "xen-lane: built in $(( $(date +%s) - start )) s; booting Xen"

# Xen: serial console, dom0 with 1 GiB and both CPUs.  -cpu qemu64: with
# `max`, Xen's SMAP under TCG crashes dom0.
xen_args="console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M \
dom0_max_vcpus=2 noreboot"
dom0_args="console=hvc0 quiet xenlane.tree=$TREE \
xenlane.cases=$(echo "${XEN_LANE_CASES:-all}" | tr " " +)"
rm -f "$B/qemu.pid"
status=0
{ timeout "$timeout" qemu-system-x86_64 -accel tcg -cpu qemu64 -smp 2 \
      -m 2048 -nographic -no-reboot -pidfile "$B/qemu.pid" \
      -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
      -virtfs local,path="$TREE",mount_tag=tree,security_model=none,readonly=on,multidevs=remap \
      -kernel "$B/xen.elf" -append "$xen_args" \
      -initrd "/boot/vmlinuz-$kver $dom0_args,$B/dom0.cpio.gz" \
      </dev/null 2>&1
  echo "HOST: qemu exited with status $?"; } |
    python3 tools/xen-lane/console.py "$B/console.log" "$B/qemu.pid" ||
    status=$?
echo "xen-lane: $(( $(date +%s) - start )) s in all; console log in $B/console.log"
exit $status
