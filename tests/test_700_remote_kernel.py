"""The kernel lane (make test-kernel): the kernel's NBD client on one
host attaches an export that `nbdplug serve` offers over TLS (X.509, the
kind nbd-client speaks) from another, and the filesystem on it mounts
and reads back."""

import os

import pytest

from conftest import NBDPLUG, REPO, run
from netns import TwoHosts
from nbdplug import server
from test_700_remote_serve import make_pki

pytestmark = pytest.mark.kernel
MiB = 1 << 20


def free_nbd():
    run(["modprobe", "nbd"])
    for name in sorted((n for n in os.listdir("/sys/block")
                        if n.startswith("nbd")), key=lambda n: int(n[3:])):
        if not os.path.exists(f"/sys/block/{name}/pid"):
            return f"/dev/{name}"
    raise AssertionError("no free /dev/nbd device")


def test_kernel_nbd_client_over_tls(tmp_path):
    files = tmp_path / "files"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "hostname").write_text("guest\n")
    blob = os.urandom(3 * MiB + 123)
    (files / "blob.bin").write_bytes(blob)
    image = tmp_path / "fs.raw"
    run(["mkfs.ext4", "-q", "-d", files, image, "32M"])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with TwoHosts() as hosts:
        pki = make_pki(tmp_path / "pki", [hosts.server.ip])
        pidfile = tmp_path / "server.pid"
        hosts.server.run(NBDPLUG + [
            "serve", "--listen", f"{hosts.server.ip}:10809",
            "--tls-certs", pki.server, "--tls-verify-peer",
            "--pidfile", pidfile, "--export", f"fs={image}:raw"], cwd=REPO)
        dev = free_nbd()
        try:
            # -nonetlink: the kernel's nbd netlink family exists only in
            # the first network namespace; the ioctls work in any.
            hosts.client.run([
                "nbd-client", hosts.server.ip, "10809", dev, "-N", "fs",
                "-b", "512", "-readonly", "-nonetlink",
                "-certfile", pki.client / "client-cert.pem",
                "-keyfile", pki.client / "client-key.pem",
                "-cacertfile", pki.client / "ca-cert.pem"])
            run(["mount", "-o", "ro,noload", dev, mnt])
            try:
                assert (mnt / "etc" / "hostname").read_text() == "guest\n"
                assert (mnt / "blob.bin").read_bytes() == blob
            finally:
                run(["umount", mnt])
        finally:
            run(["nbd-client", "-d", dev], check=False)
            server.stop(str(pidfile))
