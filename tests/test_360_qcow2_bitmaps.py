"""Persistent dirty bitmaps that qemu-img keeps in a qcow2: listed by
info as qemu-img lists them, counted by check as references (a leak
repair must not free them), ignored once a write of ours clears their
autoclear bit, and a damaged directory a clear check error."""

import json
import struct

import pytest

from conftest import nbdplug, run
from nbdplug import open_image
from test_310_qcow2_read import qemu_io
from test_320_qcow2_write import assert_checks_agree, our_check

MiB = 1 << 20
EXT_BITMAPS = 0x23852875


@pytest.fixture
def image(tmp_path):
    """A qcow2 with two bitmaps (one of 4 KiB granularity), written to
    while both were recording."""
    path = tmp_path / "bm.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"])
    run(["qemu-img", "bitmap", "--add", path, "daily"])
    run(["qemu-img", "bitmap", "--add", "-g", "4096", path, "fine"])
    qemu_io(path, "write -P 7 0 8M", "write -P 9 40M 3M")
    return path


def bitmaps_of(info):
    return info["format-specific"]["data"].get("bitmaps")


def test_info_lists_bitmaps_like_qemu_img(image):
    ours = json.loads(nbdplug("info", "--output=json", image).stdout)
    theirs = json.loads(run(["qemu-img", "info", "--output=json",
                             image]).stdout)
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    assert [b["name"] for b in bitmaps_of(ours)] == ["daily", "fine"]


def test_check_counts_bitmap_clusters_and_repair_keeps_them(image):
    report = assert_checks_agree(image)
    assert report.get("leaks", 0) == 0
    before = image.read_bytes()
    nbdplug("check", "-r", "leaks", image)
    assert image.read_bytes() == before     # nothing to repair
    assert bitmaps_of(json.loads(run(["qemu-img", "info", "--output=json",
                                      image]).stdout))
    run(["qemu-img", "check", image])


def test_a_write_of_ours_makes_the_bitmaps_stale(image):
    nbdplug_write(image)
    report = assert_checks_agree(image)
    # The directory, two tables and the data clusters: qemu-img agrees.
    assert report["leaks"] >= 4
    info = json.loads(nbdplug("info", "--output=json", image).stdout)
    assert bitmaps_of(info) is None
    nbdplug("check", "-r", "leaks", image)
    assert our_check(image)[0].get("leaks", 0) == 0
    run(["qemu-img", "check", image])


def nbdplug_write(image):
    with open_image(str(image), "qcow2", readonly=False) as disk:
        disk.pwrite(b"\x5a" * 65536, 1 * MiB)


def _directory(image):
    """(file offset of the extension's data, directory offset)."""
    data = image.read_bytes()
    pos = struct.unpack_from(">I", data, 100)[0]        # header_length
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        assert kind, "no bitmaps extension"
        if kind == EXT_BITMAPS:
            return pos + 8, struct.unpack_from(">Q", data, pos + 8 + 16)[0]
        pos += 8 + -(-length // 8) * 8


def _poke(image, offset, fmt, value):
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize("where, fmt, value", [
    ("ext", ">I", 1 << 20),                     # nb_bitmaps
    ("ext+8", ">Q", 1 << 40),                   # directory size
    ("ext+16", ">Q", 1 << 50),                  # directory offset
    ("dir+8", ">I", 1 << 31),                   # table size
    ("dir+0", ">Q", 1 << 50),                   # table offset
    ("dir+17", ">B", 63),                       # granularity
])
def test_damaged_bitmaps_judged_as_qemu_judges_them(image, where, fmt,
                                                     value):
    """Where qemu refuses to open the image, so do we (one line; check
    exits 1, "could not open"; the file is not written, even by a
    repair); where it opens it, so do we, and check ends as qemu-img
    check does."""
    ext, directory = _directory(image)
    base, _, add = where.partition("+")
    _poke(image, (ext if base == "ext" else directory) + int(add or 0),
          fmt, value)
    before = image.read_bytes()
    qemu_opens = run(["qemu-img", "info", str(image)],
                     check=False).returncode == 0
    qemu_check = run(["qemu-img", "check", str(image)],
                     check=False).returncode
    for extra in ((), ("-r", "leaks")):
        proc = nbdplug("check", *extra, image, check=False)
        assert "Traceback" not in proc.stderr
        if qemu_opens:
            assert proc.returncode == qemu_check, proc.stdout
            break               # a repair would change the image
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert image.name in lines[0] and "bitmap" in lines[0]
        assert image.read_bytes() == before
    assert (nbdplug("info", image, check=False).returncode == 0) == \
        qemu_opens
