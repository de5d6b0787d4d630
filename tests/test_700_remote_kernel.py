"""The kernel lane (make test-kernel): on one host, the kernel's NBD
client attaches an export that `nbdplug serve` offers over TLS from
another, directly (nbd-client with X.509, the kind it speaks) and through
`nbdplug attach nbds://...` (TLS-PSK); the filesystem on it mounts and
reads back."""

import os

import pytest

from conftest import NBDPLUG, REPO, run
from netns import TwoHosts
from nbdplug.serve import nbdkit as server
from test_600_hotplug import HOTPLUG
from test_700_remote_serve import make_pki, psk_uri

pytestmark = pytest.mark.kernel
MiB = 1 << 20


def free_nbd():
    run(["modprobe", "nbd"])
    for name in sorted((n for n in os.listdir("/sys/block")
                        if n.startswith("nbd")), key=lambda n: int(n[3:])):
        if not os.path.exists(f"/sys/block/{name}/pid"):
            return f"/dev/{name}"
    raise AssertionError("no free /dev/nbd device")


def make_fs(tmp_path):
    """An ext4 image holding two files; returns it and the blob's bytes."""
    files = tmp_path / "files"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "hostname").write_text("guest\n")
    blob = os.urandom(3 * MiB + 123)
    (files / "blob.bin").write_bytes(blob)
    image = tmp_path / "fs.raw"
    run(["mkfs.ext4", "-q", "-d", files, image, "32M"])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return image, blob, mnt


def assert_mounts_with_files(dev, mnt, blob):
    """The filesystem make_fs wrote mounts from `dev` and reads back."""
    run(["mount", "-o", "ro,noload", dev, mnt])
    try:
        assert (mnt / "etc" / "hostname").read_text() == "guest\n"
        assert (mnt / "blob.bin").read_bytes() == blob
    finally:
        run(["umount", mnt])


def test_kernel_nbd_client_over_tls(tmp_path):
    image, blob, mnt = make_fs(tmp_path)
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
            assert_mounts_with_files(dev, mnt, blob)
        finally:
            run(["nbd-client", "-d", dev], check=False)
            server.stop(str(pidfile))


def test_nbdplug_attach_remote_uri(tmp_path):
    """`nbdplug attach nbds://...` on the client host: a local nbdkit
    relays the remote export (TLS-PSK, by libnbd) to /dev/nbdN."""
    image, blob, mnt = make_fs(tmp_path)
    env = dict(os.environ, NBDPLUG_RUN_DIR=str(tmp_path / "run"))
    os.mkdir(env["NBDPLUG_RUN_DIR"])
    with TwoHosts() as hosts:
        pki = make_pki(tmp_path / "pki", [hosts.server.ip])
        pidfile = tmp_path / "server.pid"
        hosts.server.run(NBDPLUG + [
            "serve", "--listen", f"{hosts.server.ip}:10809",
            "--tls-psk", pki.psk, "--pidfile", pidfile,
            "--export", f"fs={image}:raw"], cwd=REPO)
        uri = psk_uri(hosts.server.ip, 10809, "fs", pki)
        try:
            out = hosts.client.run(HOTPLUG + ["attach", "--readonly", uri],
                                   cwd=REPO, env=env).stdout
            dev = out.split()[0]
            assert dev.startswith("/dev/nbd"), out
            # Mounted here: `ip netns exec` has a mount namespace of its own.
            assert_mounts_with_files(dev, mnt, blob)
            listed = hosts.client.run(HOTPLUG + ["list"], cwd=REPO,
                                      env=env).stdout
            assert uri in listed and dev in listed, listed
        finally:
            hosts.client.run(HOTPLUG + ["detach", "--all"], cwd=REPO,
                             env=env, check=False)
            server.stop(str(pidfile))
        assert not os.path.exists(f"/sys/block/{dev[5:]}/pid")
        assert os.listdir(env["NBDPLUG_RUN_DIR"]) in ([], [".lock"])
