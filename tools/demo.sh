#!/bin/bash
# make demo: the administrator's day.  Build a guest image with a GPT and
# an ext4 filesystem holding sample files; make an empty target image with
# a partition and filesystem; mount both and cp -a; unmount; convert the
# target with a progress bar; mount the result read-only and diff -r it
# against the source; clean up: qcow2 -> cp -a -> VMDK -> convert -> VHD.
# Kernel NBD where the kernel has it, nbdfuse + loop devices elsewhere.
set -euo pipefail

work=$(mktemp -d /tmp/nbdplug-demo.XXXXXX)
# A private state directory: detach --all below touches only the demo's.
export NBDPLUG_RUN_DIR="$work/run"
cleanup() {
    set +e
    nbdplug detach --all >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
src_fmt=qcow2 mid_fmt=vmdk out_fmt=vpc

# new_disk FMT PATH [FILES]: a 256 MiB image, one GPT partition, ext4.
new_disk() {
    local fmt=$1 path=$2 files=${3:-} dev part
    nbdplug create -q -f "$fmt" "$path" 256M
    dev=$(nbdplug attach -f "$fmt" "$path" | head -n 1)
    # parted may fail to tell a kernel without partition support; the
    # table is written all the same, and attach maps it from userspace.
    parted -s "$dev" mklabel gpt mkpart guest ext4 1MiB 100% 2>/dev/null || true
    nbdplug detach "$path" >/dev/null
    part=$(nbdplug attach -f "$fmt" "$path" | awk '$1 == "p1" {print $2}')
    mkfs.ext4 -q -L guest ${files:+-d "$files"} "$part"
    nbdplug detach "$path" >/dev/null
    echo "$path: $fmt, GPT, partition 1 ext4${files:+ holding $files}"
}

mkdir -p "$work"/{files/etc,files/var/log,src,dst,out}
echo "hello from the guest" > "$work/files/hello.txt"
printf 'guest-vm\n' > "$work/files/etc/hostname"
seq 1 20000 > "$work/files/var/log/messages"
head -c 3000000 /dev/urandom > "$work/files/blob.bin"
ln -s hello.txt "$work/files/link"

step "A $src_fmt guest image with a GPT and an ext4 filesystem"
new_disk "$src_fmt" "$work/guest.$src_fmt" "$work/files"
nbdplug info "$work/guest.$src_fmt"

step "An empty $mid_fmt target with a partition and a filesystem"
new_disk "$mid_fmt" "$work/target.$mid_fmt"

step "Mount both (the source read-only) and copy the files across"
nbdplug mount -f "$src_fmt" --readonly "$work/guest.$src_fmt" "$work/src"
nbdplug mount -f "$mid_fmt" "$work/target.$mid_fmt" "$work/dst"
nbdplug list
cp -a "$work/src/." "$work/dst/"
du -sh "$work/dst"
nbdplug umount "$work/dst"
nbdplug umount "$work/src"

step "Convert the $mid_fmt target to $out_fmt, with a progress bar"
nbdplug convert -p -f "$mid_fmt" -O "$out_fmt" "$work/target.$mid_fmt" \
    "$work/result.$out_fmt"
nbdplug info "$work/result.$out_fmt"
qemu-img compare -f "$mid_fmt" -F "$out_fmt" "$work/target.$mid_fmt" \
    "$work/result.$out_fmt"

step "Mount the $out_fmt result read-only and diff -r it against the source"
nbdplug mount -f "$src_fmt" --readonly "$work/guest.$src_fmt" "$work/src"
nbdplug mount -f "$out_fmt" --readonly "$work/result.$out_fmt" "$work/out"
diff -r --no-dereference "$work/src" "$work/out"
echo "diff -r: the $out_fmt copy holds exactly the source's files"
nbdplug umount "$work/out"
nbdplug umount "$work/src"

step "Clean up"
nbdplug list
echo "demo finished: $src_fmt -> cp -a -> $mid_fmt -> convert -> $out_fmt;"
echo "nothing left mounted, attached or running"
