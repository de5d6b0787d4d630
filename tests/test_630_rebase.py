"""nbdplug rebase, with qemu-img as the reference: the reference (backing
file name and format) it records, the guest bytes a safe rebase keeps,
the images it refuses to touch."""

import json
import os
import shutil

import pytest

from conftest import nbdplug, qemu_img_check_clean, run, served
from test_310_qcow2_read import qemu_io

from nbdplug import open_image

KiB, MiB = 1 << 10, 1 << 20


# --- helpers ----------------------------------------------------------------

def qcow2(path, size="8M", backing=None, backing_fmt="qcow2", *opts):
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", str(backing), "-F", backing_fmt]
    for o in opts:
        argv += ["-o", o]
    run(argv + [str(path)] + ([size] if size else []))
    return path


def qemu_info(image):
    return json.loads(run(["qemu-img", "info", "--output=json", "-U",
                           str(image)]).stdout)


def qemu_raw(image, tmp_path, name):
    raw = tmp_path / name
    run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)])
    return raw.read_bytes()


def our_raw(image):
    with open_image(str(image)) as disk:
        buf = bytearray(disk.size)
        disk.pread(memoryview(buf), 0)
    return bytes(buf)


def allocated_top(image):
    """(start, length) of data/zero runs qemu-img map finds in the top
    layer itself (depth 0, present)."""
    out = json.loads(run(["qemu-img", "map", "--output=json", "-U",
                          str(image)]).stdout)
    return [(e["start"], e["length"]) for e in out
            if e["depth"] == 0 and e["present"]]


def chain(tmp_path, cs=64 * KiB, compat="1.1"):
    """base <- mid <- top, each layer writing whole, partial and zeroed
    clusters, and a second base `other` that differs from the old chain
    in some ranges and agrees in others."""
    opts = [f"cluster_size={cs}", f"compat={compat}"]
    base = qcow2(tmp_path / "base.qcow2", "8M", None, "qcow2", *opts)
    qemu_io(base, "write -P 0x11 0 3M", "write -P 0x12 5M 1M")
    mid = qcow2(tmp_path / "mid.qcow2", "8M", "base.qcow2", "qcow2", *opts)
    qemu_io(mid, f"write -P 0x21 {MiB + cs + 512} 1536",
            "write -P 0x22 2M 512K", f"write -z {4 * MiB} {2 * cs}",
            "write -P 0x23 7M 4096")
    top = qcow2(tmp_path / "top.qcow2", "8M", "mid.qcow2", "qcow2", *opts)
    qemu_io(top, "write -P 0x31 64K 4096", f"write -z {5 * MiB} {cs}",
            "write -P 0x32 6M 128K")
    other = qcow2(tmp_path / "other.qcow2", "8M", None, "qcow2")
    # Agrees with the old chain on [0, 1M) except one sector; differs on
    # [2M, 3M) and where the old chain reads zeros ([3M, 5M)).
    qemu_io(other, "write -P 0x11 0 1M", "write -P 0x99 1000K 512",
            "write -P 0x77 2M 3M")
    return base, mid, top, other


def assert_refused(args, image, match, tmp_path=None):
    """One line on stderr, exit 2, no traceback, image byte-identical."""
    before = open(image, "rb").read() if os.path.exists(image) else None
    proc = nbdplug("rebase", *args, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert match in lines[0], lines[0]
    if before is not None:
        assert open(image, "rb").read() == before
    return lines[0]


def assert_rebased(image, backing, before, tmp_path):
    """qemu-img sees the new qcow2 backing file, checks the image clean,
    and qemu-img and we read the guest bytes of `before`."""
    info = qemu_info(image)
    assert info["backing-filename"] == backing
    assert info["backing-filename-format"] == "qcow2"
    qemu_img_check_clean(image)
    assert qemu_raw(image, tmp_path, "after.raw") == before
    assert our_raw(image) == before


# --- unsafe -----------------------------------------------------------------

@pytest.mark.parametrize("fmt_arg", [None, "raw", "qcow2"])
def test_unsafe_records_name_and_format(tmp_path, fmt_arg):
    base, mid, top, _ = chain(tmp_path)
    new = tmp_path / "new.img"
    if fmt_arg == "raw":
        new.write_bytes(bytes(8 * MiB))
    else:
        qcow2(new)
    args = ["-u", "-b", "new.img"] + (["-F", fmt_arg] if fmt_arg else [])
    nbdplug("rebase", *args, top)
    info = qemu_info(top)
    assert info["backing-filename"] == "new.img"     # stored as given
    assert info["full-backing-filename"] == str(new)
    # Without -F the probed format is recorded, as create does.
    assert info["backing-filename-format"] == (fmt_arg or "qcow2")
    qemu_img_check_clean(top)
    # The top layer's own data is untouched; the rest reads from new.img.
    raw = our_raw(top)
    assert raw == qemu_raw(top, tmp_path, "after.raw")
    assert raw[64 * KiB:68 * KiB] == b"\x31" * 4096
    assert raw[:64 * KiB] == bytes(64 * KiB)


def test_unsafe_after_moving_the_parent(tmp_path):
    (tmp_path / "a").mkdir()
    parent = qcow2(tmp_path / "a" / "parent.qcow2")
    qemu_io(parent, "write -P 0x5a 0 1M", "write -P 0x5b 3M 100K")
    child = qcow2(tmp_path / "child.qcow2", "8M", "a/parent.qcow2")
    qemu_io(child, "write -P 0x6c 512K 1M")
    before = qemu_raw(child, tmp_path, "before.raw")
    assert our_raw(child) == before

    (tmp_path / "b").mkdir()
    os.rename(parent, tmp_path / "b" / "parent.qcow2")
    assert run(["qemu-img", "convert", "-O", "raw", str(child),
                str(tmp_path / "x.raw")], check=False).returncode
    # The old parent is gone: unsafe mode must not need it.
    nbdplug("rebase", "-u", "-b", "b/parent.qcow2", "-F", "qcow2", child)

    assert_rebased(child, "b/parent.qcow2", before, tmp_path)
    with served(str(child), "qcow2", readonly=True) as srv:
        h = srv.connect()
        assert h.pread(2 * MiB, 0) == before[:2 * MiB]
        assert h.pread(200 * KiB, 3 * MiB) == before[3 * MiB:3 * MiB +
                                                     200 * KiB]


def test_unsafe_keeps_other_extensions(tmp_path):
    """A persistent bitmap (header extension + autoclear bit) survives
    the header rewrite."""
    base = qcow2(tmp_path / "base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", "8M", "base.qcow2")
    run(["qemu-img", "bitmap", "--add", str(top), "b0"])
    new = qcow2(tmp_path / "new.qcow2")
    nbdplug("rebase", "-u", "-b", new.name, top)
    info = qemu_info(top)
    assert info["backing-filename"] == "new.qcow2"
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in bitmaps] == ["b0"]
    qemu_img_check_clean(top)
    assert base.exists()


def test_unsafe_drops_reference(tmp_path):
    base = qcow2(tmp_path / "base.qcow2")
    qemu_io(base, "write -P 0x44 0 1M")
    top = qcow2(tmp_path / "top.qcow2", "8M", "base.qcow2")
    qemu_io(top, "write -P 0x45 4M 64K")
    nbdplug("rebase", "-u", "-b", "", top)
    info = qemu_info(top)
    assert "backing-filename" not in info
    qemu_img_check_clean(top)
    raw = our_raw(top)
    assert raw == qemu_raw(top, tmp_path, "after.raw")
    assert raw[:MiB] == bytes(MiB)
    assert raw[4 * MiB:4 * MiB + 64 * KiB] == b"\x45" * 64 * KiB


# --- safe -------------------------------------------------------------------

@pytest.mark.parametrize("cs,compat", [(64 * KiB, "1.1"), (512, "1.1"),
                                       (4 * KiB, "0.10")])
def test_safe_rebase_keeps_guest_bytes(tmp_path, cs, compat):
    base, mid, top, other = chain(tmp_path, cs, compat)
    before = qemu_raw(top, tmp_path, "before.raw")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(top, theirs)

    nbdplug("rebase", "-b", "other.qcow2", top)

    assert_rebased(top, "other.qcow2", before, tmp_path)
    # qemu-img rebase on the same inputs: the same guest bytes.
    run(["qemu-img", "rebase", "-b", "other.qcow2", "-F", "qcow2",
         str(theirs)])
    assert qemu_raw(theirs, tmp_path, "theirs.raw") == before
    # Only what differs was copied: [0, 960K) reads the same from both
    # chains and stays unallocated in the top layer (the old top layer
    # held 64K-68K there); the sector at 1000K that differs is copied.
    alloc = allocated_top(top)
    covered = {o for s, n in alloc for o in range(s, s + n, 512)}
    for off in range(0, 960 * KiB, 512):
        assert (off in covered) == (64 * KiB <= off < 68 * KiB or
                                    (cs == 64 * KiB and
                                     64 * KiB <= off < 128 * KiB)), off
    assert 1000 * KiB in covered


def test_safe_rebase_onto_grandparent(tmp_path):
    base, mid, top, _ = chain(tmp_path)
    before = qemu_raw(top, tmp_path, "before.raw")
    nbdplug("rebase", "-b", "base.qcow2", "-F", "qcow2", top)
    assert qemu_info(top)["backing-filename"] == "base.qcow2"
    qemu_img_check_clean(top)
    assert qemu_raw(top, tmp_path, "after.raw") == before
    os.unlink(mid)                  # no longer part of the chain
    assert our_raw(top) == before


def test_safe_rebase_onto_larger_parent(tmp_path):
    """Beyond the old parent's end the old chain reads zeros; the new
    parent's data there must be hidden by zeros in the image."""
    old = qcow2(tmp_path / "old.qcow2", "2M")
    qemu_io(old, "write -P 0x10 0 2M")
    top = qcow2(tmp_path / "top.qcow2", "8M", "old.qcow2")
    qemu_io(top, "write -P 0x20 1M 64K")
    new = qcow2(tmp_path / "new.qcow2", "8M")
    qemu_io(new, "write -P 0x30 0 8M")
    before = qemu_raw(top, tmp_path, "before.raw")
    nbdplug("rebase", "-b", "new.qcow2", top)
    qemu_img_check_clean(top)
    assert qemu_raw(top, tmp_path, "after.raw") == before
    assert before[2 * MiB:] == bytes(6 * MiB)


def test_flatten(tmp_path):
    base, mid, top, _ = chain(tmp_path)
    before = qemu_raw(top, tmp_path, "before.raw")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(top, theirs)
    run(["qemu-img", "rebase", "-b", "", str(theirs)])
    nbdplug("rebase", "-b", "", top)
    info = qemu_info(top)
    assert "backing-filename" not in info
    qemu_img_check_clean(top)
    os.unlink(mid)
    os.unlink(base)
    assert qemu_raw(top, tmp_path, "after.raw") == before
    assert our_raw(top) == before
    assert qemu_raw(theirs, tmp_path, "theirs.raw") == before


def test_safe_rebase_with_extended_l2(tmp_path):
    base = qcow2(tmp_path / "base.qcow2", "4M", None, "qcow2",
                 "extended_l2=on")
    qemu_io(base, "write -P 0x1 0 4M")
    top = qcow2(tmp_path / "top.qcow2", "4M", "base.qcow2", "qcow2",
                "extended_l2=on")
    qemu_io(top, "write -P 0x2 4K 2K", "write -z 64K 2K")
    qcow2(tmp_path / "new.qcow2", "4M")
    before = qemu_raw(top, tmp_path, "before.raw")
    nbdplug("rebase", "-b", "new.qcow2", top)
    qemu_img_check_clean(top)
    assert qemu_raw(top, tmp_path, "after.raw") == before
    assert our_raw(top) == before


def test_rebase_refused_while_in_use(tmp_path):
    base, mid, top, _ = chain(tmp_path)
    with served(str(top), "qcow2"):
        assert_refused(["-u", "-b", "base.qcow2", top], top, "lock")
    assert qemu_info(top)["backing-filename"] == "mid.qcow2"


# --- bad input ---------------------------------------------------------------

def test_refused_missing_image(tmp_path):
    assert_refused(["-u", "-b", "x", tmp_path / "nope.qcow2"],
                   tmp_path / "nope.qcow2", "No such file")


@pytest.mark.parametrize("unsafe", [True, False])
def test_refused_bad_backing(tmp_path, unsafe):
    base, mid, top, other = chain(tmp_path)
    u = ["-u"] if unsafe else []
    assert_refused(u + ["-b", "missing.qcow2", top], top, "missing.qcow2")
    assert_refused(u + ["-b", "top.qcow2", top], top, "image itself")
    # A child of top: rebasing top onto it makes a loop.
    qcow2(tmp_path / "child.qcow2", "8M", "top.qcow2")
    assert_refused(u + ["-b", "child.qcow2", top], top, "loop")
    # Outside the allowed root (symlinks resolved) ...
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    outside.mkdir(exist_ok=True)
    qcow2(outside / "p.qcow2")
    os.symlink(outside / "p.qcow2", tmp_path / "link.qcow2")
    assert_refused(u + ["-b", "link.qcow2", top], top, "outside")
    # ... unless --backing-root adds it.
    nbdplug("rebase", *u, "--backing-root", outside, "-b", "link.qcow2",
            top)
    assert qemu_info(top)["backing-filename"] == "link.qcow2"
    shutil.rmtree(outside)


@pytest.mark.parametrize("unsafe", [True, False])
def test_refused_name_too_long(tmp_path, unsafe):
    base, mid, top, other = chain(tmp_path)
    u = ["-u"] if unsafe else []
    # Resolves to other.qcow2, but longer than qcow2's 1023 bytes.
    assert_refused(u + ["-b", "./" * 520 + "other.qcow2", top], top,
                   "too long")
    # Within the limit but not within a 512-byte first cluster.
    small = qcow2(tmp_path / "small.qcow2", "8M", "base.qcow2", "qcow2",
                  "cluster_size=512")
    assert_refused(u + ["-b", "./" * 200 + "other.qcow2", small], small,
                   "does not fit")
    # One that fits is recorded (the feature name table gives way).
    nbdplug("rebase", *u, "-b", "./" * 150 + "other.qcow2", small)
    assert qemu_info(small)["backing-filename"].endswith("/other.qcow2")
    qemu_img_check_clean(small)


def test_refused_formats(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    qcow2(tmp_path / "new.qcow2", "1M")
    assert_refused(["-u", "-b", "new.qcow2", raw], raw, "not supported")
    vhdx = tmp_path / "disk.vhdx"
    run(["qemu-img", "create", "-q", "-f", "vhdx", str(vhdx), "1M"])
    assert_refused(["-u", "-b", "new.qcow2", vhdx], vhdx, "not supported")
    assert_refused(["-b", "", "-F", "qcow2", raw], raw, "-F")


# --- vmdk ---------------------------------------------------------------------

def vmdk(path, size="4M", backing=None):
    argv = ["qemu-img", "create", "-q", "-f", "vmdk"]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "vmdk"]
    run(argv + [str(path)] + ([size] if size else []))
    return path


def descriptor_keys(image):
    """Key=value lines of the descriptor embedded in a sparse VMDK."""
    text = open(image, "rb").read(64 * KiB).split(b"# Disk DescriptorFile",
                                                   1)[1].split(b"\0", 1)[0]
    return dict(line.split("=", 1) for line in text.decode().splitlines()
                if "=" in line and not line.startswith("#"))


def vmdk_cid(image, key="CID"):
    return int(descriptor_keys(image)[key], 16)


def test_vmdk_unsafe_after_moving_the_parent(tmp_path):
    (tmp_path / "a").mkdir()
    parent = vmdk(tmp_path / "a" / "p.vmdk")
    qemu_io(parent, "write -P 0x5a 0 1M", fmt="vmdk")
    child = vmdk(tmp_path / "c.vmdk", None, "a/p.vmdk")
    qemu_io(child, "write -P 0x6c 512K 128K", fmt="vmdk")
    before = qemu_raw(child, tmp_path, "before.raw")
    (tmp_path / "b").mkdir()
    os.rename(parent, tmp_path / "b" / "p.vmdk")
    nbdplug("rebase", "-u", "-b", "b/p.vmdk", child)
    keys = descriptor_keys(child)
    assert keys["parentFileNameHint"] == '"b/p.vmdk"'
    assert vmdk_cid(child, "parentCID") == vmdk_cid(tmp_path / "b" /
                                                   "p.vmdk")
    assert qemu_info(child)["backing-filename"] == "b/p.vmdk"
    qemu_img_check_clean(child)
    assert qemu_raw(child, tmp_path, "after.raw") == before
    assert our_raw(child) == before


def test_vmdk_unsafe_records_the_new_parents_cid(tmp_path):
    """qemu refuses a delta whose parentCID is not its parent's CID, so
    reading through qemu proves the CID recorded."""
    parent = vmdk(tmp_path / "p.vmdk")
    child = vmdk(tmp_path / "c.vmdk", None, "p.vmdk")
    other = vmdk(tmp_path / "o.vmdk")
    qemu_io(other, "write -P 0x42 0 4M", fmt="vmdk")
    nbdplug("rebase", "-u", "-b", "o.vmdk", child)
    assert vmdk_cid(child, "parentCID") == vmdk_cid(other)
    assert qemu_raw(child, tmp_path, "after.raw") == b"\x42" * 4 * MiB
    assert our_raw(child) == b"\x42" * 4 * MiB
    assert parent.exists()


def test_vmdk_safe_rebase_and_flatten(tmp_path):
    parent = vmdk(tmp_path / "p.vmdk")
    qemu_io(parent, "write -P 0x11 0 2M", "write -P 0x12 3M 4K",
            fmt="vmdk")
    child = vmdk(tmp_path / "c.vmdk", None, "p.vmdk")
    qemu_io(child, "write -P 0x21 1M 64K", fmt="vmdk")
    other = vmdk(tmp_path / "o.vmdk")
    qemu_io(other, "write -P 0x77 0 4M", fmt="vmdk")
    before = qemu_raw(child, tmp_path, "before.raw")

    nbdplug("rebase", "-b", "o.vmdk", child)
    assert vmdk_cid(child, "parentCID") == vmdk_cid(other)
    assert qemu_info(child)["backing-filename"] == "o.vmdk"
    qemu_img_check_clean(child)
    assert qemu_raw(child, tmp_path, "after.raw") == before
    assert our_raw(child) == before

    nbdplug("rebase", "-b", "", child)
    assert "backing-filename" not in qemu_info(child)
    assert vmdk_cid(child, "parentCID") == 0xFFFFFFFF
    os.unlink(other)
    os.unlink(parent)
    qemu_img_check_clean(child)
    assert qemu_raw(child, tmp_path, "flat.raw") == before
    assert our_raw(child) == before


def test_vmdk_refusals(tmp_path):
    vmdk(tmp_path / "p.vmdk")
    child = vmdk(tmp_path / "c.vmdk", None, "p.vmdk")
    qcow2(tmp_path / "q.qcow2", "4M")
    assert_refused(["-u", "-b", "q.qcow2", child], child, "VMDK parent")
    assert_refused(["-b", "q.qcow2", "-F", "qcow2", child], child,
                   "VMDK parent")
    assert_refused(["-u", "-b", 'p".vmdk', child], child, "p\"")
    assert_refused(["-u", "-b", "c.vmdk", child], child, "image itself")

