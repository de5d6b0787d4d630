"""qcow2 images we create and write through NBD: qemu-img check clean,
qemu-img compare identical to the model; nbdplug check agrees with
qemu-img check, also on images corrupted on purpose."""

import json
import os
import random
import struct

import pytest

from conftest import nbdplug, qemu_img_compare, run, served
from test_310_qcow2_read import qemu_io

KiB, MiB = 1 << 10, 1 << 20


def qemu_check(image):
    proc = run(["qemu-img", "check", "--output=json", str(image)],
               check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    return json.loads(proc.stdout)


def our_check(image, *extra):
    proc = nbdplug("check", "--output=json", *extra, image, check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    return json.loads(proc.stdout), proc.returncode


def assert_checks_agree(image):
    theirs = qemu_check(image)
    ours, _ = our_check(image)
    for key in ("corruptions", "leaks", "check-errors"):
        assert ours.get(key, 0) == theirs.get(key, 0), (key, ours, theirs)
    return ours


def random_io(h, model, rng, ops, cs):
    """Random NBD writes, overwrites, zeroes, trims and flushes, applied
    to `model` as well.  Trimmed ranges are re-read to learn what they
    now hold (NBD leaves it unspecified)."""
    size = len(model)
    for _ in range(ops):
        r = rng.random()
        if r < 0.3:
            off = rng.randrange(size // cs) * cs
            length = cs * rng.choice((1, 1, 2, 3))
        else:
            off = rng.randrange(size // 512) * 512 + rng.choice((0, 0, 7))
            length = rng.randint(1, 3 * cs)
        length = min(length, size - off)
        kind = rng.random()
        if kind < 0.6:
            data = rng.randbytes(length)
            h.pwrite(data, off)
            model[off:off + length] = data
        elif kind < 0.75:
            h.zero(length, off, 0 if rng.random() < 0.5 else 1)  # MAY_TRIM
            model[off:off + length] = bytes(length)
        elif kind < 0.9:
            h.trim(length, off)
            model[off:off + length] = h.pread(length, off)
        else:
            h.flush()
    h.flush()


CONFIGS = [
    {"cluster_size": "65536"},
    {"cluster_size": "512"},
    {"cluster_size": "4096", "compat": "0.10"},
    {"cluster_size": "65536", "extended_l2": "on"},
    {"cluster_size": "4096", "refcount_bits": "1"},
    {"cluster_size": "16384", "refcount_bits": "64"},
]


@pytest.mark.parametrize("opts", CONFIGS,
                         ids=[",".join(f"{k}={v}" for k, v in c.items())
                              for c in CONFIGS])
@pytest.mark.parametrize("with_backing", [False, True])
def test_random_writes_check_clean(tmp_path, opts, with_backing):
    size = 4 * MiB
    cs = int(opts["cluster_size"])
    image = tmp_path / "img.qcow2"
    model = bytearray(size)
    args = ["create", "-q", "-f", "qcow2", "-o",
            ",".join(f"{k}={v}" for k, v in opts.items())]
    if with_backing:
        base = tmp_path / "base.raw"
        model[:] = random.Random(1).randbytes(size - MiB) + bytes(MiB)
        base.write_bytes(model[:size - MiB])       # shorter than the top
        args += ["-b", "base.raw", "-F", "raw"]
    nbdplug(*args, image, str(size))
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        random_io(h, model, random.Random(cs), 250, cs)
        assert h.pread(size, 0) == bytes(model)
    expect = tmp_path / "expect.raw"
    expect.write_bytes(model)
    qemu_img_compare(str(image), str(expect), "qcow2", "raw")
    theirs = qemu_check(image)
    assert theirs.get("corruptions", 0) == 0 and \
        theirs.get("leaks", 0) == 0, theirs
    assert_checks_agree(image)


def test_cow_over_compressed_and_snapshot_clusters(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(bytes([i]) * (64 * KiB) for i in range(64)))
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(image)])
    run(["qemu-img", "snapshot", "-c", "s1", str(image)])
    model = bytearray(src.read_bytes())
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        for off, n in ((100, 1000), (64 * KiB * 5 + 7, 70 * KiB),
                       (64 * KiB * 20, 64 * KiB)):
            data = os.urandom(n)
            h.pwrite(data, off)
            model[off:off + n] = data
        h.zero(64 * KiB, 64 * KiB * 30)
        model[64 * KiB * 30:64 * KiB * 31] = bytes(64 * KiB)
        h.flush()
    expect = tmp_path / "expect.raw"
    expect.write_bytes(model)
    qemu_img_compare(str(image), str(expect), "qcow2", "raw")
    # The snapshot still holds the original bytes.
    snap = tmp_path / "snap.raw"
    run(["qemu-img", "convert", "-l", "s1", "-O", "raw", str(image),
         str(snap)])
    assert snap.read_bytes() == src.read_bytes()
    ours = assert_checks_agree(image)
    assert ours.get("corruptions", 0) == 0 and ours.get("leaks", 0) == 0


def test_refcount_table_grows(tmp_path):
    # 512-byte clusters with 64-bit refcounts: one refcount block covers
    # 64 clusters and the first table only 64 blocks, so filling 8 MiB
    # must grow the refcount table and add many blocks.
    image = tmp_path / "img.qcow2"
    nbdplug("create", "-q", "-f", "qcow2", "-o",
            "cluster_size=512,refcount_bits=64", image, "8M")
    data = os.urandom(8 * MiB)
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        for off in range(0, 8 * MiB, 256 * KiB):
            h.pwrite(data[off:off + 256 * KiB], off)
        h.flush()
    expect = tmp_path / "expect.raw"
    expect.write_bytes(data)
    qemu_img_compare(str(image), str(expect), "qcow2", "raw")
    theirs = qemu_check(image)
    assert theirs.get("corruptions", 0) == 0 and \
        theirs.get("leaks", 0) == 0, theirs
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           str(image)]).stdout)
    assert info["format-specific"]["data"]["refcount-bits"] == 64


def test_discard_frees_and_reuses_clusters(tmp_path):
    image = tmp_path / "img.qcow2"
    nbdplug("create", "-q", "-f", "qcow2", image, "16M")
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        h.pwrite(os.urandom(8 * MiB), 0)
        h.flush()
        size_full = os.path.getsize(image)
        blocks_full = os.stat(image).st_blocks
        h.trim(8 * MiB, 0)
        h.flush()
        assert os.stat(image).st_blocks < blocks_full - (7 * MiB) // 512
        h.pwrite(os.urandom(8 * MiB), 8 * MiB)
        h.flush()
        # Freed clusters were reused: the file did not grow by 8 MiB.
        assert os.path.getsize(image) < size_full + MiB
    theirs = qemu_check(image)
    assert theirs.get("corruptions", 0) == 0 and \
        theirs.get("leaks", 0) == 0, theirs


def _l2_entry_offset(image, guest_offset):
    """Host offset of the L2 entry for `guest_offset` (64 KiB clusters)."""
    with open(image, "rb") as f:
        hdr = f.read(104)
        l1_offset = struct.unpack_from(">Q", hdr, 40)[0]
        f.seek(l1_offset + 8 * (guest_offset >> 29))
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        return l2 + 8 * ((guest_offset >> 16) & 8191)


def _refcount_entry_offset(image, host_offset):
    with open(image, "rb") as f:
        hdr = f.read(104)
        rt = struct.unpack_from(">Q", hdr, 48)[0]
        f.seek(rt)
        block = struct.unpack(">Q", f.read(8))[0]
        return block + 2 * (host_offset >> 16)


def _poke(image, offset, fmt, value):
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _peek(image, offset, fmt):
    with open(image, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


CORRUPTIONS = ["leak", "refcount_low", "l2_unaligned", "l2_past_eof",
               "double_reference", "copied_flag"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_check_agrees_on_corrupted_images(tmp_path, kind):
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(image), "4M"])
    qemu_io(image, "write -P 1 0 64k", "write -P 2 1M 64k")
    l2e = _l2_entry_offset(image, 0)
    entry = _peek(image, l2e, ">Q")
    host = entry & 0x00FFFFFFFFFFFE00
    if kind == "leak":
        end = os.path.getsize(image)
        with open(image, "r+b") as f:
            f.truncate(end + 65536)
        _poke(image, _refcount_entry_offset(image, end), ">H", 1)
    elif kind == "refcount_low":
        _poke(image, _refcount_entry_offset(image, host), ">H", 0)
    elif kind == "l2_unaligned":
        _poke(image, l2e, ">Q", entry + 512)
    elif kind == "l2_past_eof":
        _poke(image, l2e, ">Q", (entry & ~0x00FFFFFFFFFFFE00) | (1 << 40))
    elif kind == "double_reference":
        _poke(image, _l2_entry_offset(image, MiB), ">Q", entry)
    elif kind == "copied_flag":
        _poke(image, l2e, ">Q", entry & ~(1 << 63))
    theirs = qemu_check(image)
    ours = assert_checks_agree(image)
    assert ours.get("corruptions", 0) + ours.get("leaks", 0) > 0
    if kind == "leak":
        assert ours["leaks"] == theirs["leaks"] == 1
        ours, code = our_check(image, "-r", "leaks")
        assert code == 0, ours
        assert qemu_check(image).get("leaks", 0) == 0


def test_corrupt_image_refused_for_writing(tmp_path):
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(image), "4M"])
    qemu_io(image, "write -P 1 0 64k")
    features = _peek(image, 72, ">Q")
    _poke(image, 72, ">Q", features | 2)             # the corrupt bit
    before = image.read_bytes()
    proc = nbdplug("serve", "-f", "qcow2", image, check=False)
    assert proc.returncode == 2
    assert "corrupt" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert image.read_bytes() == before
    # Read-only use still works.
    with served(str(image), "qcow2", readonly=True) as srv:
        assert srv.connect().pread(4, 0) == b"\x01" * 4


def test_runtime_corruption_marks_image_and_turns_readonly(tmp_path):
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(image), "4M"])
    qemu_io(image, "write -P 1 0 64k")
    l2e = _l2_entry_offset(image, 0)
    entry = _peek(image, l2e, ">Q")
    _poke(image, l2e, ">Q", entry | 0x200)           # misaligned offset
    import nbd
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 512, 2 * MiB)            # writing has stopped
        assert e.value.errno == "EIO"                # as qemu fails them
        assert h.pread(512, 2 * MiB) == bytes(512)   # reads go on
    assert _peek(image, 72, ">Q") & 2                # corrupt bit set


def test_dirty_bit_rebuilds_refcounts_before_writing(tmp_path):
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on",
         str(image), "4M"])
    qemu_io(image, "write -P 1 0 64k", "write -P 2 1M 64k")
    # What an unclean shutdown with lazy refcounts leaves: the dirty bit
    # and a data cluster whose refcount was never written.
    host = _peek(image, _l2_entry_offset(image, MiB), ">Q") & \
        0x00FFFFFFFFFFFE00
    _poke(image, _refcount_entry_offset(image, host), ">H", 0)
    _poke(image, 72, ">Q", _peek(image, 72, ">Q") | 1)
    before = image.read_bytes()
    with served(str(image), "qcow2", readonly=True) as srv:
        assert srv.connect().pread(4, MiB) == b"\x02" * 4
    assert image.read_bytes() == before          # read-only: untouched
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        h.pwrite(b"\x03" * 65536, 2 * MiB)       # must not reuse `host`
        h.flush()
        assert h.pread(4, MiB) == b"\x02" * 4
    assert not _peek(image, 72, ">Q") & 1        # dirty bit cleared
    theirs = qemu_check(image)
    assert theirs.get("corruptions", 0) == 0 and \
        theirs.get("leaks", 0) == 0, theirs


@pytest.mark.parametrize("ctype,cs", [("zlib", 65536), ("zstd", 4096)])
def test_compressed_writes_packed_like_qemu(tmp_path, ctype, cs):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for i in range(96):
            f.write(bytes([i]) * 32768 if i % 3 else os.urandom(32768))
    image = tmp_path / "img.qcow2"
    nbdplug("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
            f"compression_type={ctype},cluster_size={cs}", src, image)
    qemu_img_compare(str(image), str(src), "qcow2", "raw")
    theirs = qemu_check(image)
    assert theirs.get("corruptions", 0) == 0 and \
        theirs.get("leaks", 0) == 0, theirs
    assert theirs["compressed-clusters"] > 0
    # Several compressed clusters share a host cluster.
    assert os.path.getsize(image) < os.path.getsize(src) * 0.6
    # Overwriting part of a compressed cluster copies it on write.
    model = bytearray(src.read_bytes())
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        h.pwrite(b"\xee" * 1000, 40000)
        h.flush()
    model[40000:41000] = b"\xee" * 1000
    expect = tmp_path / "expect.raw"
    expect.write_bytes(model)
    qemu_img_compare(str(image), str(expect), "qcow2", "raw")
    assert_checks_agree(image)
