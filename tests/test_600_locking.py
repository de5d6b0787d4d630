"""Image locks: the same bytes qemu locks, so neither of us writes an image
the other holds read-write, and read-only sharing needs --force-share."""

import os
import select
import signal

import pytest

from conftest import nbdplug, run, served, sparse_raw
from nbdplug import ImageError, open_image
from nbdplug.serve import nbdkit as server

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    return sparse_raw(tmp_path / "disk.raw", 4 * MiB)


def test_qemu_refuses_an_image_we_serve_read_write(image):
    with served(image, "raw"):
        proc = run(["qemu-io", "-f", "raw", "-c", "write 0 4096", image],
                   check=False)
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr
        run(["qemu-img", "info", "-U", "-f", "raw", image])


def test_second_read_write_open_fails_clearly(image):
    with served(image, "raw"):
        with pytest.raises(ImageError, match=r'"write" lock: the image is '
                           r'in use by another process'):
            open_image(image, "raw", readonly=False)
        with pytest.raises(ImageError, match=r'shared "write" lock'):
            open_image(image, "raw", readonly=True)
        proc = nbdplug("serve", "-f", "raw", image, check=False)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and "in use" in proc.stderr


def test_force_share_reads_a_live_image(image):
    with served(image, "raw") as srv:
        h = srv.connect()
        h.pwrite(b"\x42" * 4096, MiB)
        h.flush()
        with open_image(image, "raw", readonly=True, share=True) as disk:
            buf = bytearray(4096)
            disk.pread(memoryview(buf), MiB)
            assert buf == b"\x42" * 4096
        with served(image, "raw", readonly=True,
                    extra=["force-share=true"]) as ro:
            assert ro.connect().pread(4096, MiB) == b"\x42" * 4096


def test_we_refuse_an_image_qemu_holds_read_write(image, tmp_path):
    sock = str(tmp_path / "q.sock")
    pidfile = str(tmp_path / "q.pid")
    run(["qemu-nbd", "-f", "raw", "-k", sock, "--pid-file", pidfile,
         "--fork", "--persistent", image])
    try:
        with pytest.raises(ImageError, match="in use by another process"):
            open_image(image, "raw", readonly=False)
        with open_image(image, "raw", readonly=True, share=True):
            pass
    finally:
        pid = server.wait_pidfile(pidfile, timeout=10)
        pidfd = os.pidfd_open(pid)
        os.kill(pid, signal.SIGTERM)
        gone = select.select([pidfd], [], [], 10)[0]
        if not gone:
            os.kill(pid, signal.SIGKILL)
        os.close(pidfd)
        assert gone, "qemu-nbd lingers"
    # Locks go with the process: once qemu-nbd has gone, we may write.
    with open_image(image, "raw", readonly=False):
        pass


def test_locks_released_on_close(image):
    for _ in range(2):
        with open_image(image, "raw", readonly=False):
            pass
    disk = open_image(image, "raw", readonly=False)
    disk.close()
    with open_image(image, "raw", readonly=False):
        pass
