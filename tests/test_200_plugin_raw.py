"""Real nbdkit serving the real plugin, checked with real NBD clients."""

import os
import threading

import nbd
import pytest

from conftest import pattern, qemu_img_compare, run, served, sparse_raw
from test_100_raw_driver import seek_runs

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    return sparse_raw(tmp_path / "disk.raw", 32 * MiB, [
        (off, pattern(3 * MiB // 2, i))
        for i, off in enumerate((MiB, 9 * MiB, 20 * MiB + 4096))])


def test_qemu_img_compare_identical(image):
    with served(image, "raw") as srv:
        qemu_img_compare(srv.uri, image, "raw", "raw")


def test_qemu_io_writes_land_byte_exact(image):
    with served(image, "raw") as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 5000 70000",
             "-c", "write -P 0xcd 31M 1M", "-c", "flush", srv.uri])
    with open(image, "rb") as f:
        data = f.read()
    assert data[5000:75000] == b"\xab" * 70000
    assert data[31 * MiB:] == b"\xcd" * MiB
    assert data[MiB:5000 + MiB] == pattern(3 * MiB // 2, 0)[:5000]


def test_nbdcopy_writes_land(image, tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(pattern(32 * MiB, 42))
    with served(image, "raw") as srv:
        run(["nbdcopy", str(src), srv.uri])
    with open(image, "rb") as f:
        assert f.read() == src.read_bytes()


def parse_nbdinfo_map(text):
    runs = []
    for line in text.splitlines():
        off, length, typ = line.split()[:3]
        runs.append((int(off), int(length), int(typ)))
    return runs


def test_nbdinfo_map_matches_seek_hole(image):
    with served(image, "raw") as srv:
        out = run(["nbdinfo", "--map", srv.uri]).stdout
    expect = [(o, n, 0 if d else 3) for o, n, d in seek_runs(image)]
    assert parse_nbdinfo_map(out) == expect
    assert len(expect) >= 6      # holes and data alternate


def test_trim_frees_blocks(image):
    before = os.stat(image).st_blocks
    with served(image, "raw") as srv:
        h = srv.connect()
        assert h.can_trim()
        h.trim(MiB, 9 * MiB)
        h.flush()
        assert h.pread(MiB, 9 * MiB) == bytes(MiB)
    assert before - os.stat(image).st_blocks >= MiB // 512


def test_write_zeroes_reads_back_zero(image):
    with served(image, "raw") as srv:
        h = srv.connect()
        h.zero(MiB + 12345, MiB + 100)
        h.zero(8192, 20 * MiB + 4096, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(MiB + 12345, MiB + 100) == bytes(MiB + 12345)
    with open(image, "rb") as f:
        data = f.read()
    assert data[MiB + 100:2 * MiB + 12445] == bytes(MiB + 12345)
    assert data[MiB:MiB + 100] == pattern(100, 0)
    assert data[20 * MiB + 4096:20 * MiB + 12288] == bytes(8192)


@pytest.mark.parametrize("how", ["export", "server"])
def test_readonly_refuses_writes(image, how):
    st = os.stat(image)
    with open(image, "rb") as f:
        before = f.read()
    kwargs = ({"readonly": True} if how == "export"
              else {"nbdkit_args": ["-r"]})
    with served(image, "raw", **kwargs) as srv:
        h = srv.connect(strict=False)     # the server must refuse, too
        assert h.is_read_only()
        for call in (lambda: h.pwrite(b"x" * 4096, 0),
                     lambda: h.trim(4096, 0),
                     lambda: h.zero(4096, 0)):
            with pytest.raises(nbd.Error) as e:
                call()
            assert e.value.errno == "EPERM"
        proc = run(["qemu-io", "-f", "raw", "-c", "write 0 4096", srv.uri],
                   check=False)
        assert proc.returncode != 0
        assert "Permission denied" in proc.stderr
    with open(image, "rb") as f:
        assert f.read() == before
    assert os.stat(image).st_mtime_ns == st.st_mtime_ns


def test_two_connections_disjoint_writes(image):
    chunk = 256 * 1024
    with served(image, "raw") as srv:
        handles = [srv.connect() for _ in range(2)]
        assert all(h.can_multi_conn() for h in handles)

        def writer(i, h):
            for k in range(i, 128, 2):     # interleaved disjoint chunks
                h.pwrite(pattern(chunk, k), k * chunk)
            h.flush()

        threads = [threading.Thread(target=writer, args=(i, h))
                   for i, h in enumerate(handles)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with open(image, "rb") as f:
        for k in range(128):
            assert f.read(chunk) == pattern(chunk, k), f"chunk {k}"
