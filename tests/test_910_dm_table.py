"""The fast-path table as data (dm/fast.py) and the live manager's
rounds (dm/manager.py) against a device that records what it is asked:
device-mapper itself runs in the kernel lane (test_920_fast_kernel.py)."""

import os

import pytest

from conftest import run
from test_600_hotplug import HOTPLUG
from dm import fast, manager
from dm.fast import Piece
from nbdplug import open_image
from nbdplug.disk import HostRange

MiB = 1 << 20
KiB = 1 << 10


def test_pieces_keep_whole_sectors_and_merge():
    ranges = [HostRange(0, 4096, "f", 8192),
              HostRange(4096, 4096, "f", 12288),     # continues: merged
              HostRange(8192, 700, "f", 20480),      # a partial sector
              HostRange(8892, 1348, None, None),
              HostRange(10240, 1024, "g", 100)]      # not sector aligned
    assert fast.pieces_of(ranges) == [
        Piece(0, 16, "f", 16), Piece(16, 17, "f", 40), Piece(17, 22)]


def test_splice_replaces_only_what_was_read_again():
    old = [Piece(0, 100), Piece(100, 200, "f", 0), Piece(200, 1000)]
    fresh = [Piece(150, 160, "f", 50), Piece(300, 310, "f", 500)]
    assert fast.splice(old, fresh) == [
        Piece(0, 100), Piece(100, 200, "f", 0), Piece(200, 300),
        Piece(300, 310, "f", 500), Piece(310, 1000)]


def test_bounded_demotes_the_smallest_direct_pieces():
    # Direct pieces of growing size, each between NBD pieces.
    pieces, pos = [], 0
    for i in range(100):
        pieces += [Piece(pos, 1000 * i + 10),
                   Piece(1000 * i + 10, 1000 * i + 20 + i, "f", 7919 * i)]
        pos = 1000 * i + 20 + i
    pieces.append(Piece(pos, 100100))
    out = fast.bounded(pieces, 41)
    assert len(out) <= 41
    kept = [p for p in out if p.path]
    assert kept == [p for p in pieces if p.path][-20:]
    assert out[0].start == 0 and out[-1].end == 100100
    # Back-to-back direct pieces: demoting one alone saves nothing.
    tight = [Piece(i, i + 1, "f", 2 * i) for i in range(50)]
    assert len(fast.bounded(tight, 10)) <= 10


def test_fit_sends_what_lies_past_a_device_to_nbd():
    pieces = [Piece(0, 8, "f", 0), Piece(8, 16, "f", 100)]
    assert fast.fit(pieces, {"f": 104 * 512}) == [
        Piece(0, 8, "f", 0), Piece(8, 12, "f", 100), Piece(12, 16)]


def test_table_lines(tmp_path):
    pieces = [Piece(0, 8, "f", 16), Piece(8, 24)]
    assert fast.table(pieces, "/dev/nbd3", {"f": "/dev/loop7"}).text() == \
        "0 8 linear /dev/loop7 16\n8 16 linear /dev/nbd3 8\n"


def test_newly_direct():
    old = [Piece(0, 10, "f", 0), Piece(10, 30)]
    new = [Piece(0, 10, "f", 0), Piece(10, 20, "f", 50), Piece(20, 30)]
    assert fast.newly_direct(old, new) == [(10, 20)]
    moved = [Piece(0, 10, "f", 1), Piece(10, 30)]
    assert fast.newly_direct(old, moved) == [(0, 10)]


def test_map_dm_prints_the_table_it_would_load(tmp_path):
    image = tmp_path / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write 1M 128k", str(image)])
    out = run(HOTPLUG + ["map", "--dm", str(image)]).stdout
    lines = [line.split() for line in out.splitlines()]
    assert [(l[0], l[1], l[3]) for l in lines] == [
        ("0", "2048", "nbd"), ("2048", "256", str(image)),
        ("2304", "5888", "nbd")]
    host = int(lines[1][4]) * 512
    with open(image, "rb") as f:
        f.seek(host)
        assert f.read(128 * KiB) == b"\xcd" * (128 * KiB)


class Recorder:
    """A device-mapper device that records its tables."""

    def __init__(self, name):
        self.name = name
        self.calls = []
        self.live = self.inactive = None
        self.on_suspend = None

    def load(self, table, readonly=False):
        self.calls.append("load")
        self.inactive = table.text()

    def suspend(self):
        self.calls.append("suspend")
        if self.on_suspend:
            self.on_suspend()

    def resume(self):
        self.calls.append("resume")
        if self.inactive:
            self.live, self.inactive = self.inactive, None

    def clear(self):
        self.calls.append("clear")
        self.inactive = None


def start_manager(image, tmp_path, monkeypatch, on_create=None):
    """A Manager over `image` (opened writable) whose device records."""
    monkeypatch.setattr(manager, "_grow", lambda dev: os.path.getsize(dev))
    devices, created = [], []

    def device(name):
        devices.append(Recorder(name))
        return devices[-1]

    def create(name, table, readonly):
        created.append(table.text())
        if on_create:
            on_create()
    monkeypatch.setattr(manager.dmtable, "load", create)
    disk = open_image(str(image), "qcow2", readonly=False)
    m = manager.Manager(disk, str(tmp_path / "ctl"), device=device)
    m.start("nbdplug-x", "/dev/nbd9", {str(image): str(image)}, False)
    m.stop()        # rounds by hand
    m.running = True
    return m, disk, devices[0], created


@pytest.fixture
def managed(tmp_path, monkeypatch):
    image = tmp_path / "m.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(image)])
    m, disk, dev, created = start_manager(image, tmp_path, monkeypatch)
    yield m, disk, dev, created
    disk.close()


def test_manager_prepares_writes_before_the_table(tmp_path, monkeypatch):
    """qcow2's autoclear bits are cleared, durably, before a writable
    table exists (writes through it never reach the driver)."""
    from test_900_host_mapping import autoclear
    image = tmp_path / "b.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"])
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    seen = []
    _, disk, _, _ = start_manager(image, tmp_path, monkeypatch,
                                  lambda: seen.append(autoclear(image)))
    disk.close()
    assert seen == [0]


def test_manager_promotes_allocating_writes(managed):
    m, disk, dev, created = managed
    assert "0 2048 linear" in created[0]
    assert m.where(0) == "direct" and m.where(2 * MiB) == "nbd"
    disk.pwrite(b"\x22" * 65536, 2 * MiB)
    m.note(2 * MiB, 65536)
    m.round()
    assert dev.calls == ["load", "suspend", "resume"]
    assert m.where(2 * MiB) == "direct" and m.where(3 * MiB) == "nbd"
    assert disk.pinned(disk.path, [r for r in disk.host_mapping(
        64 * KiB, 2 * MiB)][0].host_offset, 512)
    m.round()                       # nothing noted: nothing done
    assert dev.calls == ["load", "suspend", "resume"]


def test_manager_drops_a_table_a_late_trim_made_stale(managed):
    """A trim that lands after the ranges were read, on a range the new
    table would map straight to the file: that table never goes live."""
    m, disk, dev, _ = managed
    disk.pwrite(b"\x22" * 65536, 2 * MiB)
    m.note(2 * MiB, 65536)

    def late_trim():
        disk.trim(65536, 2 * MiB)
        m.note(2 * MiB, 65536, True)
        dev.on_suspend = None
    dev.on_suspend = late_trim
    m.round()
    assert dev.calls == ["load", "suspend", "clear", "resume"]
    assert dev.live is None and m.where(2 * MiB) == "nbd"
    assert m.stats["aborted"] == 1
    m.round()           # read again: the trim left nothing to promote
    assert m.where(2 * MiB) == "nbd"


def test_manager_flushes_a_device_the_table_stops_using(managed,
                                                        monkeypatch):
    m, disk, dev, _ = managed
    flushed = []
    monkeypatch.setattr(disk, "flush", lambda: flushed.append(1))
    disk.pwrite(b"\x33" * (7 * MiB), MiB)       # all of it plain now
    m.note(MiB, 7 * MiB)
    m.round()
    assert m.status()["targets"] == 1 and flushed == [1]


def test_manager_reads_everything_again_after_too_many_notes(
        managed, monkeypatch):
    """Past LOG_LIMIT notes it keeps none and reads the whole mapping
    again; a table being loaded when that happens never goes live."""
    m, disk, dev, _ = managed
    monkeypatch.setattr(manager, "LOG_LIMIT", 3)
    disk.pwrite(b"\x22" * 65536, 2 * MiB)
    m.note(2 * MiB, 65536)

    def flood():
        for _ in range(5):
            m.note(0, 512)
        dev.on_suspend = None
    dev.on_suspend = flood
    m.round()
    assert dev.calls[-2:] == ["clear", "resume"]
    assert m.where(2 * MiB) == "nbd" and m.overflow
    m.round()
    assert m.where(2 * MiB) == "direct" and not m.overflow
