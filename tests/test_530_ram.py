"""The shared RAM disk: two nbdkit servers (or nbdkit and tapbridge) on
one `ram:NAME` see each other's writes at once, and multi-conn is
advertised; names, creation and removal through `nbdplug`; a full tmpfs
is an error, not a crash."""

import contextlib
import errno
import itertools
import json
import os
import subprocess
import sys

import nbd
import pytest

from conftest import nbdplug, run, served
from nbdplug import open_image
from nbdplug.formats.ram import DATA_OFFSET, RAM_DIR, RamDisk
from tapbridge.abi import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tapbridge"))
from tbharness import Backend, Frontend, ShmDir, sector_data  # noqa: E402

MiB = 1 << 20
_names = itertools.count()


@pytest.fixture
def ram():
    """A fresh 16 MiB RAM disk; yields its name, removes it after."""
    name = f"t530-{os.getpid()}-{next(_names)}"
    nbdplug("create", "-f", "ram", name, "16M")
    yield name
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(RAM_DIR, name))


def path(name):
    return os.path.join(RAM_DIR, name)


def test_two_servers_see_each_others_writes_at_once(ram):
    with served(path(ram), "ram") as one, served(path(ram), "ram") as two:
        a, b = one.connect(), two.connect()
        assert a.can_multi_conn() and b.can_multi_conn()
        a.pwrite(b"\x5a" * 65536, 3 * MiB + 512)
        # No flush: the other server reads the same memory.
        assert b.pread(65536, 3 * MiB + 512) == b"\x5a" * 65536
        b.pwrite(b"\xa5" * 1000, 3 * MiB + 1000)
        assert a.pread(3000, 3 * MiB) == \
            bytes(512) + b"\x5a" * 488 + b"\xa5" * 1000 + b"\x5a" * 1000
        b.zero(4096, 3 * MiB + 4096)
        assert a.pread(4096, 3 * MiB + 4096) == bytes(4096)
        info = json.loads(run(["nbdinfo", "--json", one.uri]).stdout)
        assert info["exports"][0]["can_multi_conn"] is True
    # And the file itself holds them, past the header.
    with open(path(ram), "rb") as f:
        f.seek(DATA_OFFSET + 3 * MiB + 512)
        assert f.read(488) == b"\x5a" * 488


def test_tapbridge_and_nbdkit_share_one_ram_disk(ram, tmp_path):
    """A Xen guest's ring (tapbridge) and an NBD client (nbdkit) on the
    same RAM disk read each other's writes at once."""
    shm = ShmDir(tmp_path / "shm", 16)
    ring = Frontend(shm)
    backend = Backend(shm, f"ram:{ram}", fmt="ram")
    try:
        with served(path(ram), "ram") as srv:
            h = srv.connect()
            written = sector_data(800, 8, 3)
            shm.fill(3, written)
            ring.req(BLKIF_OP_WRITE, 1, 800, [(3, 0, 7)])
            ring.push()
            assert ring.get(1) == [(1, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
            assert h.pread(4096, 800 * 512) == written
            h.pwrite(b"\x77" * 4096, 2 * MiB)
            ring.req(BLKIF_OP_READ, 2, 2 * MiB // 512, [(4, 0, 7)])
            ring.push()
            assert ring.get(1) == [(2, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
            assert shm.page(4) == b"\x77" * 4096
    finally:
        ring.close()
        assert backend.stop()[0] == 0
        shm.close()


def test_trim_returns_memory_and_extents_show_holes(ram):
    with served(path(ram), "ram") as one, served(path(ram), "ram") as two:
        a, b = one.connect(), two.connect()
        a.pwrite(os.urandom(4 * MiB), 8 * MiB)
        used = os.stat(path(ram)).st_blocks
        assert used >= 4 * MiB // 512
        b.trim(2 * MiB, 8 * MiB)
        assert os.stat(path(ram)).st_blocks <= used - 2 * MiB // 512
        assert a.pread(4096, 8 * MiB) == bytes(4096)
        out = run(["nbdinfo", "--map", "--json", two.uri]).stdout
    extents = [(e["offset"], e["length"], e["type"])
               for e in json.loads(out)]
    assert extents == [(0, 10 * MiB, 3), (10 * MiB, 2 * MiB, 0),
                       (12 * MiB, 4 * MiB, 3)]


def test_ram_names_work_wherever_an_image_does(ram):
    info = json.loads(nbdplug("info", "--output=json", f"ram:{ram}").stdout)
    assert (info["format"], info["virtual-size"]) == ("ram", 16 * MiB)
    with open_image(f"ram:{ram}", readonly=False) as disk:
        assert isinstance(disk, RamDisk) and disk.can_multi_conn
        disk.pwrite(b"hello", 100)
    # A second writer at the same time is the point (no image lock).
    with open_image(f"ram:{ram}", readonly=False) as one, \
            open_image(f"ram:{ram}", readonly=False) as two:
        one.pwrite(b"world", 200)
        buf = bytearray(105)
        two.pread(memoryview(buf), 100)
        assert buf[:5] == b"hello" and buf[100:] == b"world"
    entries = json.loads(nbdplug("map", "--output=json", f"ram:{ram}").stdout)
    assert entries[0] == {"start": 0, "length": 4096, "depth": 0,
                          "present": True, "zero": False, "data": True,
                          "offset": DATA_OFFSET}


def test_serve_by_ram_name(ram):
    out = nbdplug("serve", f"ram:{ram}").stdout.splitlines()
    try:
        h = nbd.NBD()
        h.connect_uri(out[0])
        h.pwrite(b"served", 4096)
        h.shutdown()
    finally:
        nbdplug("stop", out[0])
    with open_image(f"ram:{ram}") as disk:
        buf = bytearray(6)
        disk.pread(memoryview(buf), 4096)
        assert buf == b"served"


def test_create_and_remove(ram):
    other = ram + "-b"
    nbdplug("create", "-q", f"ram:{other}", "1000")
    assert os.path.getsize(path(other)) == DATA_OFFSET + 1024
    nbdplug("rm-ram", f"ram:{other}")
    assert not os.path.exists(path(other))
    for argv, message in (
            (["create", "-f", "ram", ram, "1M"], "already exists"),
            (["create", "-f", "qcow", f"ram:{ram}", "1M"], "format ram"),
            (["create", "-f", "ram", "../../etc/x", "1M"], "RAM disk name"),
            (["rm-ram", other], "no RAM disk named"),
            (["rm-ram", "a/b"], "RAM disk name")):
        proc = nbdplug(*argv, check=False)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
        assert message in proc.stderr


def test_removed_disk_lives_on_in_its_servers(ram):
    with served(path(ram), "ram") as one:
        a = one.connect()
        a.pwrite(b"\x11" * 512, 0)
        nbdplug("rm-ram", ram)
        assert not os.path.exists(path(ram))
        a.pwrite(b"\x22" * 512, 512)
        assert a.pread(1024, 0) == b"\x11" * 512 + b"\x22" * 512


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs",
                    str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_tmpfs_fails_the_write_and_keeps_serving(small_tmpfs):
    image = str(small_tmpfs / "disk")
    RamDisk.create(image, 8 * MiB, {})
    with served(image, "ram") as srv:
        h = srv.connect()
        h.pread(8 * MiB, 0)             # reading holes takes no memory
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"\x01" * 2 * MiB, 0)
        assert e.value.errnum == errno.ENOSPC
        h.trim(2 * MiB, 0)
        h.pwrite(b"\x02" * 4096, 4 * MiB)
        assert h.pread(4096, 4 * MiB) == b"\x02" * 4096
