"""nbdplug resize against qemu-img: after our resize qemu-img check is
clean, qemu-img info shows the size asked for, the old bytes are intact
and the new tail reads zeros (also where a backing file or stale bytes
past the old end would show); crash states of the resize open with the
old or the new size and all data; bad input is one line, exit 2, the
image untouched."""

import hashlib
import json
import os
import random

import pytest

from conftest import (nbdplug, qemu_img_check_clean, qemu_img_compare, run,
                      served)
from crashsim import Recorder, crash_states, write_state
from nbdplug import check_image, open_image
from nbdplug.errors import UnsupportedFeature
from nbdplug.ops.resize import resize_image
from nbdplug.formats.raw import RawDisk
from test_310_qcow2_read import qemu_io

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def create(path, size, opts="", backing=None, bfmt="raw"):
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing:
        argv += ["-b", str(backing), "-F", bfmt]
    run(argv + [str(path), str(size)])


def info(path):
    return json.loads(run(["qemu-img", "info", "--output=json",
                           str(path)]).stdout)


def raw_of(path, tmp_path, name="out.raw"):
    raw = tmp_path / name
    run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)])
    return raw.read_bytes()


def scribble(path, size, seed, count=6):
    """Random qemu-io writes, one of them ending at the last byte."""
    rng = random.Random(seed)
    cmds = []
    for i in range(count):
        length = rng.randrange(1, 64) * 512
        off = size - length if i == 0 else rng.randrange(
            0, size - length) // 512 * 512
        cmds.append(f"write -P {rng.randrange(1, 256)} {off} {length}")
    qemu_io(path, *cmds)


def assert_grown(path, before, new_size, tmp_path):
    """Old bytes intact, tail zeros, compared by qemu (sparse reference
    raw, so gigabyte sizes stay cheap)."""
    assert info(path)["virtual-size"] == new_size
    ref = tmp_path / "expect.raw"
    with open(ref, "wb") as f:
        f.write(before)
        f.truncate(new_size)
    qemu_img_compare(str(path), str(ref), "qcow2", "raw")


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def l1_offset(path):
    with open(path, "rb") as f:
        f.seek(40)
        return int.from_bytes(f.read(8), "big")


def qemu_resized_copy(img, tmp_path, arg, *extra):
    """The reference: the same image resized by qemu-img."""
    ref = tmp_path / "qemu.qcow2"
    run(["cp", "--sparse=always", str(img), str(ref)])
    run(["qemu-img", "resize", "-q", *extra, str(ref), "--", arg])
    return ref


# --- qcow2 growth ------------------------------------------------------------

GROW = [
    # (id, create options, old size, size argument, new L1 table?)
    ("v3-64k-inplace", "cluster_size=65536", 3 * MiB, "+5M", False),
    ("v3-512-newl1", "cluster_size=512", 1 * MiB, "+8M", True),
    ("v2-512-newl1", "cluster_size=512,compat=0.10", 1 * MiB, "9M", True),
    ("v3-512-l1-tail", "cluster_size=512", 1 * MiB + 512, "+512K", False),
    ("v3-4k-newl1", "cluster_size=4096", 1 * GiB, "+4M", True),
    ("v3-4k-refcount64", "cluster_size=4096,refcount_bits=64", 1 * GiB,
     "+3G", True),
    ("extl2-16k", "cluster_size=16384,extended_l2=on", 8 * MiB, "+100M",
     False),
    ("extl2-16k-newl1", "cluster_size=16384,extended_l2=on", 32 * GiB,
     "+16M", True),
]


@pytest.mark.parametrize("name,opts,old,arg,moves", GROW,
                         ids=[g[0] for g in GROW])
def test_qcow2_grow(tmp_path, name, opts, old, arg, moves):
    img = tmp_path / "disk.qcow2"
    create(img, old, opts)
    scribble(img, min(old, 64 * MiB), len(name))
    qemu_io(img, f"write -P 0x5c {old - 4096} 4096")
    small = old <= 64 * MiB
    before = raw_of(img, tmp_path, "before.raw") if small else None
    l1_before = l1_offset(img)
    ref = qemu_resized_copy(img, tmp_path, arg)
    proc = nbdplug("resize", img, arg)
    assert proc.stdout == "Image resized.\n" and not proc.stderr
    new = info(ref)["virtual-size"]
    assert new > old
    assert info(img)["virtual-size"] == new
    qemu_img_check_clean(img)
    assert (l1_offset(img) != l1_before) == moves
    qemu_img_compare(str(img), str(ref), "qcow2", "qcow2")
    if small:
        assert_grown(img, before, new, tmp_path)
    else:
        # (the qemu compare above covered every byte)
        qemu_io(img, f"read -P 0x5c {old - 4096} 4096",
                f"read -P 0 {old} {min(new - old, 16 * MiB)}",
                f"read -P 0 {new - MiB} 1M")
    # Writable afterwards, by qemu and by us, across the old end.
    qemu_io(img, f"write -P 0x77 {new - 1024} 1024")
    with open_image(str(img), "qcow2", readonly=False) as disk:
        disk.pwrite(b"\x66" * 8192, old - 4096)
    qemu_io(img, f"read -P 0x66 {old - 4096} 8192",
            f"read -P 0x77 {new - 1024} 1024")
    qemu_img_check_clean(img)
    if small:
        data = raw_of(img, tmp_path)
        assert data[:old - 4096] == before[:old - 4096]
        assert data[old + 4096:new - 1024] == bytes(new - old - 5120)


def test_qcow2_grow_twice_and_relative(tmp_path):
    """Repeated growth, each moving L1 again; -q prints nothing."""
    img = tmp_path / "disk.qcow2"
    create(img, 256 * KiB, "cluster_size=512")
    scribble(img, 256 * KiB, 3)
    before = raw_of(img, tmp_path, "before.raw")
    offsets = {l1_offset(img)}
    for arg in ("+3M", "8M", "+8M"):
        assert nbdplug("resize", "-q", img, arg).stdout == ""
        offsets.add(l1_offset(img))
        qemu_img_check_clean(img)
    assert len(offsets) == 4
    assert_grown(img, before, 16 * MiB, tmp_path)


def test_qcow2_stale_bytes_past_old_end(tmp_path):
    """qemu's shrink to an unaligned size keeps the last cluster whole;
    what it holds past the end must not come back on growth."""
    img = tmp_path / "disk.qcow2"
    create(img, 2 * MiB, "cluster_size=65536")
    qemu_io(img, "write -P 0xab 0 2M")
    run(["qemu-img", "resize", "-q", "--shrink", str(img), str(MiB + 512)])
    nbdplug("resize", img, "2M")
    qemu_img_check_clean(img)
    data = raw_of(img, tmp_path)
    assert data[:MiB + 512] == b"\xab" * (MiB + 512)
    assert data[MiB + 512:] == bytes(MiB - 512)


def test_qcow2_l1_tail_garbage(tmp_path):
    """Bytes past l1_size in the L1 table's last cluster mean nothing to
    qemu; growth in place must not take them for L2 tables."""
    img = tmp_path / "disk.qcow2"
    create(img, MiB, "cluster_size=512")
    qemu_io(img, "write -P 0x61 0 32K")
    with open(img, "r+b") as f:
        f.seek(36)
        l1_size = int.from_bytes(f.read(4), "big")
        offset = l1_offset(img)
        f.seek(offset)
        first = f.read(8)               # points at a live L2 table
        f.seek(offset + 8 * l1_size)
        f.write(first * 4)
    qemu_img_check_clean(img)
    before = raw_of(img, tmp_path, "before.raw")
    nbdplug("resize", img, "+64K")
    assert l1_offset(img) == offset
    qemu_img_check_clean(img)
    assert_grown(img, before, MiB + 64 * KiB, tmp_path)


@pytest.mark.parametrize("opts", ["cluster_size=512",
                                  "cluster_size=65536",
                                  "cluster_size=16384,extended_l2=on"])
def test_qcow2_grow_with_snapshots(tmp_path, opts):
    img = tmp_path / "disk.qcow2"
    create(img, MiB, opts)
    scribble(img, MiB, 11)
    snap = raw_of(img, tmp_path, "snap.raw")
    run(["qemu-img", "snapshot", "-c", "s1", str(img)])
    qemu_io(img, f"write -P 0x42 {MiB - 64 * KiB} 64K", "write -P 9 0 4K")
    before = raw_of(img, tmp_path, "before.raw")
    nbdplug("resize", img, "+7M")
    qemu_img_check_clean(img)
    assert_grown(img, before, 8 * MiB, tmp_path)
    # The snapshot keeps its size and contents, and can be applied.
    run(["qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw",
         str(img), str(tmp_path / "s1.raw")])
    # (qemu reads a snapshot at the image's current size.)
    s1 = (tmp_path / "s1.raw").read_bytes()
    assert s1[:MiB] == snap and s1[MiB:] == bytes(7 * MiB)
    with open_image(str(img), "qcow2", options={"snapshot": "s1"}) as disk:
        assert disk.size == MiB
    qemu_io(img, f"write -P 0x31 {8 * MiB - 4096} 4K")
    qemu_img_check_clean(img)
    run(["qemu-img", "snapshot", "-a", "s1", str(img)])
    qemu_img_check_clean(img)
    assert raw_of(img, tmp_path, "applied.raw") == snap


def test_qcow2_v2_with_snapshots_refused(tmp_path):
    img = tmp_path / "disk.qcow2"
    create(img, MiB, "compat=0.10")
    run(["qemu-img", "snapshot", "-c", "s1", str(img)])
    assert_refused(img, ["+1M"], "v2 image which has snapshots")


BACKED = [
    # (id, options, overlay size, backing size, new size)
    ("v3-64k", "cluster_size=65536", MiB, 4 * MiB, 6 * MiB),
    ("v3-512-newl1", "cluster_size=512", MiB, 4 * MiB, 6 * MiB),
    ("v2-4k", "cluster_size=4096,compat=0.10", MiB, 4 * MiB, 3 * MiB),
    ("v3-unaligned", "cluster_size=65536", MiB + 512, 4 * MiB, 6 * MiB),
    ("extl2", "cluster_size=16384,extended_l2=on", MiB + 1024, 4 * MiB,
     6 * MiB),
    ("backing-shorter", "cluster_size=65536", 2 * MiB, MiB, 4 * MiB),
]


@pytest.mark.parametrize("name,opts,size,bsize,new", BACKED,
                         ids=[b[0] for b in BACKED])
def test_qcow2_grow_with_backing(tmp_path, name, opts, size, bsize, new):
    """The backing file's bytes past the old end must not show through
    the new area (qemu zeroes it too)."""
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(5).randbytes(bsize))
    img = tmp_path / "disk.qcow2"
    create(img, size, opts, backing="base.raw")
    scribble(img, size, 21)
    before = raw_of(img, tmp_path, "before.raw")
    # qemu cannot zero the new area of a version 2 image.
    ref = qemu_resized_copy(img, tmp_path, str(new)) \
        if "0.10" not in opts else None
    nbdplug("resize", img, str(new))
    qemu_img_check_clean(img)
    assert info(img)["backing-filename"] == "base.raw"
    assert_grown(img, before, new, tmp_path)
    if ref is not None:
        qemu_img_compare(str(img), str(ref), "qcow2", "qcow2")
    with open_image(str(img), "qcow2") as disk:
        buf = bytearray(new - size)
        disk.pread(memoryview(buf), size)
        assert buf == bytes(new - size)


def test_resized_image_served_and_written(tmp_path):
    """Written through nbdplug's plugin (NBD) and through qemu-io after
    our resize; every byte as the model."""
    img = tmp_path / "disk.qcow2"
    create(img, MiB, "cluster_size=512")
    scribble(img, MiB, 4)
    model = bytearray(raw_of(img, tmp_path, "before.raw"))
    nbdplug("resize", img, "+4M")
    model += bytes(4 * MiB)
    rng = random.Random(8)
    with served(str(img), "qcow2") as srv:
        h = srv.connect()
        assert h.get_size() == 5 * MiB
        for _ in range(40):
            off = rng.randrange(0, 5 * MiB - 8192)
            data = rng.randbytes(rng.randrange(1, 8192))
            h.pwrite(data, off)
            model[off:off + len(data)] = data
        h.flush()
    qemu_io(img, f"write -P 0x13 {MiB - 512} 1K")
    model[MiB - 512:MiB + 512] = b"\x13" * 1024
    qemu_img_check_clean(img)
    assert raw_of(img, tmp_path) == bytes(model)


# --- crash states ------------------------------------------------------------

CRASH = [
    # (id, create options, size, new size, backing size, snapshot)
    ("v3-512-newl1", "cluster_size=512", 256 * KiB, 2 * MiB, 0, False),
    ("v2-512-backing", "cluster_size=512,compat=0.10", 128 * KiB,
     512 * KiB, 384 * KiB, False),
    ("v3-64k-inplace-backing", "cluster_size=65536", MiB + 512, 3 * MiB,
     2 * MiB, False),
    # The last L2 table, shared with the snapshot, is copied to zero
    # the new area while the L1 table moves.
    ("v3-512-snapshot-backing-newl1", "cluster_size=512", 256 * KiB + 512,
     4 * MiB, 512 * KiB, True),
    ("extl2-backing-snapshot", "cluster_size=16384,extended_l2=on",
     MiB + 1024, 4 * MiB, 2 * MiB, True),
]


@pytest.mark.parametrize("name,opts,size,new,bsize,snapshot", CRASH,
                         ids=[c[0] for c in CRASH])
def test_crash_states(tmp_path, name, opts, size, new, bsize, snapshot):
    d = tmp_path / "img"
    d.mkdir()
    img = d / "disk.qcow2"
    if bsize:
        (d / "base.raw").write_bytes(random.Random(2).randbytes(bsize))
    create(img, size, opts, backing="base.raw" if bsize else None)
    scribble(img, size, 31, count=10)
    if snapshot:
        run(["qemu-img", "snapshot", "-c", "s1", str(img)])
        qemu_io(img, "write -P 0xee 0 4K")
    before = raw_of(img, tmp_path, "before.raw")
    rec = Recorder(d)
    resize_image(str(img), new, "qcow2", file_factory=rec.open_file)
    assert sum(op[0] == "flush" for op in rec.log) >= 3
    state_dir = tmp_path / "state"
    rng = random.Random(len(name))
    seen = {size: 0, new: 0}
    count = 0
    for files, _ in crash_states(rec, rng, b"", variants=60):
        write_state(files, state_dir)
        if bsize:
            os.link(d / "base.raw", state_dir / "base.raw") \
                if not (state_dir / "base.raw").exists() else None
        spath = state_dir / "disk.qcow2"
        report = check_image(str(spath), "qcow2")
        assert report.corruptions == 0, (count, report.messages[:5])
        theirs = run(["qemu-img", "check", "--output=json", str(spath)],
                     check=False)
        assert theirs.returncode in (0, 3), (count, theirs.stdout,
                                             theirs.stderr)
        assert json.loads(theirs.stdout).get("corruptions", 0) == 0
        with open_image(str(spath), "qcow2") as disk:
            assert disk.size in (size, new), (count, disk.size)
            seen[disk.size] += 1
            buf = bytearray(disk.size)
            disk.pread(memoryview(buf), 0)
        assert buf[:size] == before, count
        assert buf[size:] == bytes(disk.size - size), count
        if count % 25 == 0:
            # qemu reads the same bytes.
            got = raw_of(spath, tmp_path, "state.raw")
            assert got == bytes(buf), count
        count += 1
    assert count >= 100 and seen[size] and seen[new], (count, seen)


# --- raw ---------------------------------------------------------------------

def test_raw_grow_sparse_and_shrink(tmp_path):
    img = tmp_path / "disk.raw"
    data = random.Random(1).randbytes(MiB + 100)
    img.write_bytes(data)
    blocks = os.stat(img).st_blocks
    nbdplug("resize", "-f", "raw", img, "+1G")
    assert os.path.getsize(img) == MiB + 100 + GiB
    assert os.stat(img).st_blocks <= blocks + 8           # sparse
    with open(img, "rb") as f:
        assert f.read(MiB + 100) == data
        assert f.read(4 * MiB) == bytes(4 * MiB)
    proc = nbdplug("resize", "-f", "raw", img, "-1G", check=False)
    assert proc.returncode == 2 and "--shrink" in proc.stderr
    assert os.path.getsize(img) == MiB + 100 + GiB
    nbdplug("resize", "-f", "raw", "--shrink", img, "-1G")
    assert img.read_bytes() == data
    nbdplug("resize", "-f", "raw", "--shrink", img, "--", "-100")
    assert img.read_bytes() == data[:MiB]
    nbdplug("resize", "-f", "raw", "--shrink", img, "1000")
    assert img.read_bytes() == data[:1000]       # raw: any byte size


def test_raw_block_device_refused(tmp_path):
    img = tmp_path / "disk.raw"
    img.write_bytes(b"x" * 4096)
    with open_image(str(img), "raw", readonly=False) as disk:
        disk.file.is_block = True           # as a device node opens
        with pytest.raises(UnsupportedFeature, match="block device"):
            RawDisk.resize(disk, 8192)
    assert img.read_bytes() == b"x" * 4096


# --- bad input ---------------------------------------------------------------

def assert_refused(img, args, match, fmt=()):
    before = digest(img) if os.path.exists(img) else None
    proc = nbdplug("resize", *fmt, img, *args, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match in lines[0], lines[0]
    if before is not None:
        assert digest(img) == before


@pytest.mark.parametrize("args,match", [
    (["12Q"], "is not a number"),
    (["+"], "is not a number"),
    (["1M"], "--shrink"),                       # from 2M
    (["-1M"], "--shrink"),
    (["0"], "must be positive"),
    (["--", "-2M"], "must be positive"),
    (["-5M"], "must be positive"),
    (["+1000"], "multiple of 512"),
    (["--shrink", "1M"], "shrinking qcow2 images is not supported"),
])
def test_bad_input_qcow2(tmp_path, args, match):
    img = tmp_path / "disk.qcow2"
    create(img, 2 * MiB, "cluster_size=512")
    scribble(img, 2 * MiB, 1)
    assert_refused(img, args, match)
    qemu_img_check_clean(img)


def test_missing_file_and_unknown_raw(tmp_path):
    assert_refused(tmp_path / "nope.qcow2", ["1M"], "No such file")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(4096))
    assert_refused(raw, ["8K"], "say -f raw")         # never guessed
    assert_refused(raw, ["--", "-4096"], "must be positive", ("-f", "raw"))
    assert_refused(raw, ["-f", "raw", "0"], "must be positive")


@pytest.mark.parametrize("fmt,opts", [("vmdk", ""), ("vpc", ""),
                                      ("vhdx", ""), ("qcow", "")])
def test_other_formats_refused(tmp_path, fmt, opts):
    img = tmp_path / f"disk.{fmt}"
    run(["qemu-img", "create", "-q", "-f", fmt, str(img), "1M"])
    assert_refused(img, ["2M"], f"resizing {fmt} images is not supported")
    assert_refused(img, ["2M"], f"({fmt})", ("-f", fmt))


def test_ram_refused():
    name = f"resize-test-{os.getpid()}"
    nbdplug("create", "-q", "-f", "ram", name, "1M")
    try:
        proc = nbdplug("resize", f"ram:{name}", "2M", check=False)
        assert proc.returncode == 2
        assert "resizing ram images is not supported" in proc.stderr
    finally:
        nbdplug("rm-ram", name)


def test_bitmaps_refused(tmp_path):
    img = tmp_path / "disk.qcow2"
    create(img, MiB)
    run(["qemu-img", "bitmap", "--add", str(img), "b0"])
    assert_refused(img, ["2M"], "persistent bitmaps")


def test_locked_image_refused(tmp_path):
    """An image another process holds is refused, as qemu-img refuses
    one we hold."""
    img = tmp_path / "disk.qcow2"
    create(img, MiB)
    with open_image(str(img), "qcow2", readonly=True):
        assert_refused(img, ["2M"], "lock")
        proc = run(["qemu-img", "resize", str(img), "2M"], check=False)
        assert proc.returncode == 1 and "lock" in proc.stderr
    nbdplug("resize", img, "2M")
    assert info(img)["virtual-size"] == 2 * MiB
