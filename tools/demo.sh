#!/bin/bash
# make demo: serve a raw guest image with nbdplug and read a file back
# through nbdfuse + a loop device + mount.  Cleans up everything it starts.
set -euo pipefail

work=$(mktemp -d /tmp/nbdplug-demo.XXXXXX)
uri="" loop="" fuse_pid=""
cleanup() {
    set +e
    mountpoint -q "$work/mnt" && umount "$work/mnt"
    [ -n "$loop" ] && losetup -d "$loop"
    if [ -n "$fuse_pid" ]; then
        fusermount3 -u "$work/fuse"
        wait "$fuse_pid" 2>/dev/null
    fi
    [ -n "$uri" ] && nbdplug stop "$uri" >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "A guest image: 64 MiB sparse raw file with ext4 and a few files"
mkdir -p "$work/files/etc" "$work/mnt" "$work/fuse"
echo "hello from the guest" > "$work/files/hello.txt"
printf 'guest-vm\n' > "$work/files/etc/hostname"
head -c 300000 /dev/urandom > "$work/files/blob.bin"
nbdplug create -f raw "$work/guest.raw" 64M
mkfs.ext4 -q -F -d "$work/files" "$work/guest.raw"
nbdplug info "$work/guest.raw"

step "Serve it with nbdplug (nbdkit + the nbdplug Python plugin)"
out=$(nbdplug serve -f raw --readonly "$work/guest.raw")
echo "$out"
uri=$(head -n1 <<<"$out")

step "What an NBD client sees (nbdinfo)"
nbdinfo "$uri" | sed -n '1,12p'

step "Allocation map, as the client sees it (nbdinfo --map)"
nbdinfo --map "$uri" | head -n 8

step "Allocation map from the driver (nbdplug map)"
nbdplug map -f raw "$work/guest.raw" | head -n 8

step "Read a file back: nbdfuse -> loop device -> mount"
nbdfuse -r -P "$work/fuse.pid" "$work/fuse/disk" "$uri" &
fuse_pid=$!
for _ in $(seq 100); do [ -s "$work/fuse.pid" ] && break; sleep 0.1; done
loop=$(losetup -f --show -r "$work/fuse/disk")
mount -o ro,nodev,nosuid "$loop" "$work/mnt"
echo "$loop mounted on $work/mnt:"
ls -l "$work/mnt"
echo "hello.txt says: $(cat "$work/mnt/hello.txt")"
cmp "$work/mnt/blob.bin" "$work/files/blob.bin" && echo "blob.bin: identical"

step "Clean up"
umount "$work/mnt"
losetup -d "$loop"; loop=""
fusermount3 -u "$work/fuse"; wait "$fuse_pid"; fuse_pid=""
nbdplug stop "$uri"; uri=""
echo "demo finished: nothing left mounted, attached or running"
