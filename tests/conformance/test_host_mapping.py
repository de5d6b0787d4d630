"""Every format's host mapping (Disk.host_mapping, what dm/'s fast path
maps straight to the file): it covers the disk in order, each plain range
holds the guest's bytes at its host offset, it stays inside what
qemu-img map calls this layer's uncompressed data, and a write made
straight into the host file there (as the kernel makes it through a
loop device) is the guest's write: qemu-img check stays clean and reads
it back where it was written, everything else unchanged."""

import json
import os

import pytest

from conformance.formats import ROWS, WRITABLE, MiB
from conftest import qemu_img_check_clean, run
from nbdplug import open_image


def host_ranges(image, fmt, readonly=True):
    with open_image(image, fmt, readonly=readonly) as disk:
        if not readonly:
            disk.prepare_writes()
        ranges = disk.host_mapping(disk.size, 0)
        assert sum(r.length for r in ranges) == disk.size
    pos = 0
    for r in ranges:
        assert r.offset == pos
        pos += r.length
    return [r for r in ranges if r.path is not None]


def plain_in_qemu_map(fixture):
    """[(start, end, host offset - start)] where qemu-img map says this
    layer stores the guest's data at a host offset (depth 0; in a raw
    file, its holes too), or None where qemu gives no offsets."""
    if not fixture.row.qemu_reads:
        return None
    fmt = fixture.row.fmt
    entries = json.loads(run(["qemu-img", "map", "-f", fmt,
                              "--output=json", fixture.image]).stdout)
    if not any("offset" in e for e in entries):
        return None             # qemu's vhdx says no more than "data"
    return [(e["start"], e["start"] + e["length"], e["offset"] - e["start"])
            for e in entries if e["depth"] == 0 and "offset" in e and
            (e["data"] or fmt == "raw")]


def test_plain_ranges_hold_the_guest_bytes(fixture):
    """Plain ranges hold the guest's bytes, and lie where qemu-img map
    finds this layer's uncompressed data: never backing data, a
    compressed or a zero cluster."""
    row = fixture.row
    ranges = host_ranges(fixture.image, row.fmt)
    assert ranges, "no plain range at all"
    reference = fixture.reference_bytes()
    for r in ranges:
        with open(r.path, "rb") as f:
            f.seek(r.host_offset)
            got = f.read(r.length)
        assert got == reference[r.offset:r.offset + r.length], r
    plain = plain_in_qemu_map(fixture)
    if plain is None:
        return
    for r in ranges:
        pos, end = r.offset, r.offset + r.length
        for start, stop, delta in plain:
            if start <= pos < min(stop, end):
                assert r.host_offset + (pos - r.offset) == pos + delta, r
                pos = min(stop, end)
        assert pos == end, (r, "not plain in qemu-img map")


@pytest.mark.parametrize("row", WRITABLE, ids=str)
def test_writes_into_plain_ranges_are_guest_writes(fixture, private):
    """Write a pattern straight into the host file at every plain range,
    as a loop device would, after prepare_writes: the image checks
    clean and reads the pattern there, the reference elsewhere."""
    row = fixture.row
    ranges = host_ranges(private, row.fmt, readonly=False)
    expected = bytearray(fixture.reference_bytes())
    for i, r in enumerate(ranges):
        data = bytes([0x40 + i % 64]) * r.length
        fd = os.open(r.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, r.host_offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        expected[r.offset:r.offset + r.length] = data
    if row.qemu_checks:
        qemu_img_check_clean(private)
    with open_image(private, row.fmt) as disk:
        assert disk.read(disk.size, 0) == expected
        if row.fmt == "vmdk":
            assert disk.cid != open_image(fixture.image, "vmdk").cid


@pytest.mark.parametrize("row", [r for r in ROWS if r.fmt == "vhdx"],
                         ids=str)
def test_vhdx_replayed_log_is_never_plain(fixture, monkeypatch):
    """A VHDX whose log was replayed in memory reads from that view, not
    the file: none of it is plain."""
    from nbdplug.formats.vhdx import disk as vhdx

    class Replayed:             # a view of the file, as log.replay gives
        def __init__(self, file):
            self.file = file

        def __getattr__(self, name):
            return getattr(self.file, name)
    monkeypatch.setattr(vhdx, "replay",
                        lambda file, header, path: Replayed(file))
    with open_image(fixture.image, "vhdx") as disk:
        assert [(r.offset, r.length, r.path) for r in
                disk.host_mapping(disk.size, 0)] == [(0, disk.size, None)]
