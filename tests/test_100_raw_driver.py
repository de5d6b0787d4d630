"""The raw driver called directly: bytes, holes, trim, zero, O_DIRECT."""

import os
import subprocess

import pytest

from nbdplug import (EXTENT_HOLE, EXTENT_ZERO, ImageError, ReadOnlyDisk,
                     RequestError, open_image)
from nbdplug.disk import check_request
from nbdplug.hostfile import STREAM_LAG, HostFile

from conftest import pattern, sparse_raw

MiB = 1 << 20


@pytest.fixture
def sparse(tmp_path):
    return sparse_raw(tmp_path / "disk.raw", 16 * MiB,
                      [(4 * MiB, pattern(MiB, 7))])


def seek_runs(path):
    """(offset, length, is_data) from SEEK_DATA/SEEK_HOLE, independently."""
    runs = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                runs.append((pos, data - pos, False))
                pos = data
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            runs.append((pos, hole - pos, True))
            pos = hole
    finally:
        os.close(fd)
    return runs


def test_pread_fills_caller_buffer(sparse):
    with open_image(sparse, "raw") as disk:
        assert disk.size == 16 * MiB
        buf = bytearray(MiB + 1024)
        disk.pread(memoryview(buf), 4 * MiB - 512)
        assert bytes(buf[:512]) == bytes(512)
        assert bytes(buf[512:512 + MiB]) == pattern(MiB, 7)
        assert bytes(buf[512 + MiB:]) == bytes(512)


def test_pwrite_lands_in_file(sparse):
    data = pattern(12345, 3)
    with open_image(sparse, "raw", readonly=False) as disk:
        disk.pwrite(data, 999, fua=True)
    with open(sparse, "rb") as f:
        f.seek(999)
        assert f.read(12345) == data


def test_extents_match_seek_hole(sparse):
    with open_image(sparse, "raw") as disk:
        ext = disk.extents(disk.size, 0)
    expect = [(o, n, 0 if d else EXTENT_HOLE | EXTENT_ZERO) for o, n, d in
              seek_runs(sparse)]
    assert [tuple(e) for e in ext] == expect
    assert any(flags == 0 for _, _, flags in expect)


def test_trim_punches_hole(sparse):
    before = os.stat(sparse).st_blocks
    with open_image(sparse, "raw", readonly=False) as disk:
        disk.trim(MiB, 4 * MiB)
        buf = bytearray(MiB)
        disk.pread(memoryview(buf), 4 * MiB)
    assert bytes(buf) == bytes(MiB)
    assert os.stat(sparse).st_blocks < before


@pytest.mark.parametrize("may_trim", [False, True])
def test_zero_reads_back_zero(sparse, may_trim):
    with open_image(sparse, "raw", readonly=False) as disk:
        disk.zero(4096 * 3, 4 * MiB + 100, may_trim=may_trim)
    with open(sparse, "rb") as f:
        f.seek(4 * MiB)
        got = f.read(MiB)
    expect = bytearray(pattern(MiB, 7))
    expect[100:100 + 4096 * 3] = bytes(4096 * 3)
    assert got == bytes(expect)


def test_host_mapping_is_identity(sparse):
    with open_image(sparse, "raw") as disk:
        ranges = disk.host_mapping(disk.size, 0)
    assert sum(r.length for r in ranges) == 16 * MiB
    for r in ranges:
        assert r.path == sparse and r.host_offset == r.offset


def test_readonly_refuses_writes(sparse):
    with open(sparse, "rb") as f:
        before = f.read()
    with open_image(sparse, "raw", readonly=True) as disk:
        for call in (lambda: disk.pwrite(b"x" * 512, 0),
                     lambda: disk.trim(4096, 0),
                     lambda: disk.zero(4096, 4 * MiB)):
            with pytest.raises(ReadOnlyDisk, match="read-only"):
                call()
    with open(sparse, "rb") as f:
        assert f.read() == before


def test_past_end_refused_at_the_front(sparse):
    """Requests are checked where they enter (nbdkit, tapbridge's
    dispatcher, Disk.read), not by each driver."""
    with open_image(sparse, "raw", readonly=False) as disk:
        for count, offset in ((4096, 16 * MiB - 100), (1, -1)):
            with pytest.raises(RequestError, match="beyond the end"):
                check_request(disk, count, offset)
        with pytest.raises(RequestError, match="beyond the end"):
            disk.read(4096, 16 * MiB - 100)
    assert os.path.getsize(sparse) == 16 * MiB


def test_direct_io_unaligned(sparse):
    data = pattern(5000, 9)
    with open_image(sparse, "raw", readonly=False, direct=True) as disk:
        assert disk.min_block == 4096
        disk.pwrite(data, 4 * MiB + 333)
        buf = bytearray(6000)
        disk.pread(memoryview(buf), 4 * MiB + 300)
    expect = bytearray(pattern(MiB, 7)[300:6300])
    expect[33:33 + 5000] = data
    assert bytes(buf) == bytes(expect)
    with open(sparse, "rb") as f:
        f.seek(4 * MiB + 300)
        assert f.read(6000) == bytes(expect)


def test_writable_open_never_probes_raw(sparse):
    with pytest.raises(ImageError, match="format not recognised"):
        open_image(sparse, None, readonly=False)
    with open_image(sparse, None, readonly=True) as disk:
        assert disk.format_name == "raw"


def test_streaming_writes_land_and_leave_the_page_cache(tmp_path):
    """HostFile.pwritev_streaming, a bulk copy's writes: the bytes land as
    pwritev's would, and all but the last STREAM_LAG ranges leave the page
    cache once written back (fincore, where the file system drops them)."""
    path = str(tmp_path / "copy.raw")
    file = HostFile(path, readonly=False, create=True)
    chunks = [pattern(MiB, i) for i in range(12)]
    try:
        for i, chunk in enumerate(chunks):
            file.pwritev_streaming([chunk[:4096], chunk[4096:]], 2 * i * MiB)
        file.flush()
    finally:
        file.close()
    fstype = subprocess.run(["stat", "-f", "-c", "%T", path], check=True,
                            capture_output=True, text=True).stdout.strip()
    if fstype != "tmpfs":
        cached = int(subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", path],
            check=True, capture_output=True, text=True).stdout)
        assert cached <= STREAM_LAG * MiB
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) == 23 * MiB
    for i, chunk in enumerate(chunks):
        assert data[2 * i * MiB:(2 * i + 1) * MiB] == chunk
        assert not any(data[(2 * i + 1) * MiB:(2 * i + 2) * MiB])
