#!/bin/sh
# fetch.sh DIR: Debian 12's Xen 4.17 hypervisor, tools and QEMU (its qdisk
# backend) as .debs from the package archive, unpacked into DIR/x and
# never installed on this machine (their maintainer scripts would set up
# grub and systemd units).  Cached: a deb already in DIR/debs is not
# fetched again, and DIR/x is unpacked again only when the set changes.
# QEMU's multiboot loader boots Xen from the ELF, so it is gunzipped.
set -eu
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
PKGS="xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common qemu-system-xen"
mkdir -p "$DIR/debs"
cd "$DIR/debs"

# (run elsewhere: apt-get prints nothing for a deb already in the directory)
uris() { (cd / && apt-get download --print-uris $PKGS 2>/dev/null); }
list=$(uris) || true
if [ -z "$list" ]; then        # no package lists yet on a fresh machine
    apt-get update -qq
    list=$(uris)
fi
want=$(printf '%s\n' "$list" | awk '{print $2}' | sort)
for deb in $want; do
    [ -s "$deb" ] || { apt-get download -q $PKGS >/dev/null 2>&1; break; }
done
for deb in $want; do
    [ -s "$deb" ] || { echo "fetch: $deb did not download" >&2; exit 1; }
done

key=$(printf '%s\n' "$want" | md5sum | cut -c1-12)
if [ "$(cat "$DIR/x.key" 2>/dev/null)" != "$key" ]; then
    rm -rf "$DIR/x" "$DIR/xen.elf"
    mkdir -p "$DIR/x"
    for deb in $want; do dpkg-deb -x "$deb" "$DIR/x"; done
    zcat "$DIR"/x/boot/xen-4.17-amd64.gz > "$DIR/xen.elf"
    echo "$key" > "$DIR/x.key"
fi
# Old versions after an archive update.
for deb in *.deb; do
    printf '%s\n' "$want" | grep -qxF "$deb" || rm -f "$deb"
done
