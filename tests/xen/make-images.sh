#!/bin/sh
# make-images.sh DIR: the lane's images, made afresh by qemu-img on the
# host (dom0 copies them into its own memory before each case).
#   seed.raw      16 MiB: random data where the plan writes and discards
#                 (xtool.c), and elsewhere, with holes between
#   raw.img       seed.raw
#   base.qcow2    seed.raw as qcow2, the backing file of
#   qcow2.qcow2   an overlay holding other data over part of the ranges
#   vmdk.vmdk     seed.raw as a monolithic sparse VMDK
#   vhd.vhd       seed.raw as a dynamic VHD (exact size: force_size)
#   ro.qcow2      seed.raw as qcow2, served read-only
#   stream.qcow2  16 MiB, empty: the destroyed domU's disk
#   bench.raw     64 MiB of random data: the throughput image
# and for each image but the last three NAME.orig, its qemu-img convert -O
# raw, and NAME.md5, the md5 of that.
set -eu
DIR=$1
rm -rf "$DIR"
mkdir -p "$DIR"
cd "$DIR"
MiB=1048576
rnd() { # OFFSET_MIB LENGTH_KIB
    head -c $(($2 * 1024)) /dev/urandom |
        dd of=seed.raw bs=1024 seek=$(($1 * 1024)) conv=notrunc status=none
}
truncate -s 16M seed.raw
rnd 0 256; rnd 1 192; rnd 2 1536; rnd 5 1024; rnd 7 4096; rnd 12 64
rnd 15 1024
cp seed.raw raw.img
q() { qemu-img "$@"; }
q convert -f raw -O qcow2 seed.raw base.qcow2
q create -q -f qcow2 -b base.qcow2 -F qcow2 qcow2.qcow2
qemu-io -f qcow2 -c "write -P 0x71 1M 128k" -c "write -P 0x72 8M 512k" \
    -c "write -P 0x73 14M 64k" qcow2.qcow2 >/dev/null
q convert -f raw -O vmdk seed.raw vmdk.vmdk
q convert -f raw -O vpc -o subformat=dynamic,force_size=on seed.raw vhd.vhd
q convert -f raw -O qcow2 seed.raw ro.qcow2
q create -q -f qcow2 stream.qcow2 16M
head -c $((64 * MiB)) /dev/urandom > bench.raw
# What each image reads as (qemu-img convert -O raw) and its md5: what the
# domU must see, and what dom0 checks its writes against.
for i in raw.img qcow2.qcow2 vmdk.vmdk vhd.vhd ro.qcow2; do
    q convert -O raw "$i" "$i.orig"
    md5sum < "$i.orig" | cut -d' ' -f1 > "$i.md5"
done
