#!/bin/sh
# Set up a fresh Debian 12 machine for nbdplug: the Debian packages it
# needs (installed only when missing), then a venv made from the system
# Python with --system-site-packages, so python3-libnbd, python3-parted
# and python3-pyudev are visible, and the project installed editable.
# Idempotent, and silent when there is nothing to do.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="
nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd nbd-client
qemu-utils fuse3 python3-venv python3-parted python3-pyudev
python3-zstandard python3-tqdm python3-matplotlib python3-pyxs
dmsetup kmod udev e2fsprogs dosfstools util-linux util-linux-extra parted
iproute2 systemd
gnutls-bin fio gcc libc6-dev libxen-dev
xenstore-utils libatomic1
python3-libvmdk python3-libvhdi python3-libqcow
linux-image-amd64 qemu-system-x86 busybox-static cpio
"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing nbdplug (editable) with test extras"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        -e '.[test]'
    touch "$stamp"
fi
