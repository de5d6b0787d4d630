"""A remote export as a Disk (nbdplug.formats.nbd over libnbd): bytes, holes
and errors against the file behind a real nbdkit serving our plugin."""

import os

import pytest

from conftest import nbdplug, run, served
from nbdplug import ImageError, ReadOnlyDisk, UsageError, open_image
from nbdplug.disk import EXTENT_HOLE, EXTENT_ZERO
from conftest import pattern
from test_100_raw_driver import seek_runs

MiB = 1 << 20
SIZE = 40 * MiB         # more than one 32 MiB request


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for i, off in enumerate((MiB, 17 * MiB + 4096, 33 * MiB)):
            f.seek(off)
            f.write(pattern(2 * MiB, i))
    return str(path)


def test_reads_writes_zero_trim_land_in_the_file(image):
    with open(image, "rb") as f:
        expect = bytearray(f.read())
    with served(image, "raw") as srv:
        with open_image(srv.uri, readonly=False) as disk:
            assert disk.size == SIZE
            buf = bytearray(SIZE)
            disk.pread(memoryview(buf), 0)
            assert buf == expect
            data = pattern(34 * MiB + 100, 9)
            disk.pwrite(data, 3 * MiB + 7, fua=True)
            expect[3 * MiB + 7:37 * MiB + 107] = data
            disk.zero(MiB + 3, 5 * MiB)
            expect[5 * MiB:6 * MiB + 3] = bytes(MiB + 3)
            disk.trim(2 * MiB, 20 * MiB)
            expect[20 * MiB:22 * MiB] = bytes(2 * MiB)
            disk.flush()
            part = bytearray(4096)
            disk.pread(memoryview(part), 37 * MiB)
            assert part == expect[37 * MiB:37 * MiB + 4096]
    with open(image, "rb") as f:
        assert f.read() == expect


def test_map_matches_the_files_holes(image):
    with served(image, "raw", readonly=True) as srv:
        with open_image(srv.uri) as disk:
            extents = [(e.offset, e.length, e.flags)
                       for e in disk.extents(SIZE, 0)]
            part = disk.map(3 * MiB, MiB // 2)
    assert extents == [(o, n, 0 if d else EXTENT_HOLE | EXTENT_ZERO)
                       for o, n, d in seek_runs(image)]
    assert part[0].offset == MiB // 2 and not part[0].data
    assert sum(r.length for r in part) == 3 * MiB


def test_cli_info_and_convert(image, tmp_path):
    with served(image, "raw", readonly=True) as srv:
        out = nbdplug("info", srv.uri).stdout
        assert f"({SIZE} bytes)" in out
        dst = tmp_path / "copy.qcow2"
        nbdplug("convert", "-O", "qcow2", srv.uri, dst)
    run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", dst,
         image])


def test_tls_options_instead_of_query(image, tmp_path):
    psk = tmp_path / "keys.psk"
    run(["psktool", "-u", "alice", "-p", psk])
    with served(image, "raw", readonly=True, nbdkit_args=[
            "--tls=require", f"--tls-psk={psk}"]) as srv:
        uri = srv.uri.replace("nbd+unix:", "nbds+unix:")
        options = {"tls-psk-file": str(psk), "tls-username": "alice"}
        with open_image(uri, options=options) as disk:
            assert disk.info()["tls"] is True
            assert disk.size == SIZE
        with pytest.raises(ImageError, match="mallory was not found"):
            open_image(uri, options={**options, "tls-username": "mallory"})
        with pytest.raises(ImageError, match="TLS"):
            open_image(srv.uri)             # clear text to a TLS server


def test_refusals(image):
    with served(image, "raw", readonly=True) as srv:
        with pytest.raises(ReadOnlyDisk, match="read-only"):
            open_image(srv.uri, readonly=False)
        with pytest.raises(UsageError, match="read as raw"):
            open_image(srv.uri, "qcow2")
        with pytest.raises(UsageError, match="tls-bogus"):
            open_image(srv.uri, options={"tls-bogus": "1"})
        with open_image(srv.uri) as disk:
            with pytest.raises(ReadOnlyDisk):
                disk.pwrite(b"x" * 512, 0)
        st = os.stat(image)
    assert os.stat(image).st_mtime_ns == st.st_mtime_ns


def test_server_gone_is_an_error_not_data(image):
    with served(image, "raw", readonly=True) as srv:
        disk = open_image(srv.uri)
        srv.close_clients()
    buf = bytearray(4096)
    with pytest.raises(ImageError, match="read at 0") as e:
        disk.pread(memoryview(buf), 0)
    assert e.value.errno and buf == bytes(4096)
    disk.close()
