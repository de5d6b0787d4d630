"""nbdplug convert: every format we read to every format we write, equal
byte for byte to a source qemu-img wrote (qemu-img compare), sparse where
the source was (qemu-img map), opened by qemu-img; bounded memory."""

import json
import os
import resource

import pytest

from conftest import NBDPLUG, REPO, nbdplug, qemu_img_compare, run
from nbdplug import FORMATS

MiB = 1 << 20
SIZE = 128 * MiB
# (offset, length, byte) written by qemu-io into the source; byte None is
# an explicit zero write (-z: zero clusters where the format has them).
WRITES = [(0, MiB, 0x11), (5 * MiB + 4096, 3 * MiB, 0x22),
          (10 * MiB, 2 * MiB, None), (16 * MiB, MiB, 0),
          (40 * MiB + 512, 70000, 0x33), (127 * MiB, MiB, 0x44)]
HOLE = (64 * MiB, 96 * MiB)     # nothing written: a whole VHDX block too

# Formats qemu-img knows, so it can write the sources and judge outputs.
QEMU_FORMATS = ("raw", "qcow2", "qcow", "vmdk", "vpc", "vhdx")
READABLE = list(QEMU_FORMATS)
WRITABLE = [f for f in READABLE if FORMATS[f].create is not None]


def qemu_source(tmp_path, fmt):
    path = str(tmp_path / f"src.{fmt}")
    opts = ["-o", "force_size=on"] if fmt == "vpc" else []
    run(["qemu-img", "create", "-q", "-f", fmt, *opts, path, str(SIZE)])
    cmds = []
    for off, n, byte in WRITES:
        cmds += ["-c", f"write -z {off} {n}" if byte is None
                 else f"write -P {byte} {off} {n}"]
    run(["qemu-io", "-f", fmt, *cmds, path])
    return path


def data_ranges(path, fmt):
    """Ranges stored as data in the image itself (not its backing)."""
    entries = json.loads(run(["qemu-img", "map", "-f", fmt, "--output=json",
                              path]).stdout)
    return [(e["start"], e["start"] + e["length"]) for e in entries
            if e["data"] and e["depth"] == 0]


def unit_of(path, fmt):
    info = json.loads(run(["qemu-img", "info", "-f", fmt, "--output=json",
                           path]).stdout)
    return info.get("cluster-size", 4096)


def assert_sparse(path, fmt):
    """Every allocation unit holding data in the output holds non-zero
    source data: holes, zero writes and zero data stay unallocated."""
    unit = unit_of(path, fmt)
    nonzero = [(o // unit * unit, -(-(o + n) // unit) * unit)
               for o, n, b in WRITES if b]
    for start, end in data_ranges(path, fmt):
        for u in range(start // unit * unit, end, unit):
            assert any(a <= u < b for a, b in nonzero), \
                f"{path}: unit at {u:#x} is data, the source had zeros"
        assert end <= HOLE[0] or start >= HOLE[1], (start, end)


def qemu_img_check(path, fmt):
    """Clean, or a format qemu-img cannot check (63, e.g. vpc, raw)."""
    proc = run(["qemu-img", "check", "-f", fmt, path], check=False)
    assert proc.returncode in (0, 63), proc.stdout + proc.stderr


@pytest.mark.parametrize("out_fmt", WRITABLE)
@pytest.mark.parametrize("src_fmt", READABLE)
def test_convert_matrix(tmp_path, src_fmt, out_fmt):
    src = qemu_source(tmp_path, src_fmt)
    dst = str(tmp_path / f"dst.{out_fmt}")
    nbdplug("convert", "-f", src_fmt, "-O", out_fmt, src, dst)
    qemu_img_compare(src, dst, src_fmt, out_fmt)
    assert_sparse(dst, out_fmt)
    run(["qemu-img", "info", "-f", out_fmt, dst])
    qemu_img_check(dst, out_fmt)


@pytest.mark.parametrize("out_fmt", [f for f in WRITABLE
                                     if FORMATS[f].compress])
def test_convert_compressed(tmp_path, out_fmt):
    src = qemu_source(tmp_path, "raw")
    dst = str(tmp_path / f"dst.{out_fmt}")
    nbdplug("convert", "-c", "-f", "raw", "-O", out_fmt, src, dst)
    qemu_img_compare(src, dst, "raw", out_fmt)
    qemu_img_check(dst, out_fmt)


def test_convert_onto_backing(tmp_path):
    """-B: what the source's top layer lacks is left to the backing file;
    zeros it holds over backing data are written as zeros."""
    base = qemu_source(tmp_path, "raw")
    top = str(tmp_path / "top.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
         top])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 2M 1M",
         "-c", "write -z 0 64k", top])
    dst = str(tmp_path / "dst.qcow2")
    nbdplug("convert", "-f", "qcow2", "-O", "qcow2", "-B", base, "-F", "raw",
            top, dst)
    qemu_img_compare(top, dst, "qcow2", "qcow2")
    info = json.loads(run(["qemu-img", "info", "--output=json", dst]).stdout)
    assert info["backing-filename"] == base
    assert all(s >= 2 * MiB or e <= 64 * 1024 for s, e in data_ranges(
        dst, "qcow2") if s < 3 * MiB), "base data was copied into dst"


def test_progress_bar_with_p(tmp_path):
    src = qemu_source(tmp_path, "raw")
    proc = nbdplug("convert", "-p", "-O", "raw", src, tmp_path / "out.raw")
    assert "converting" in proc.stderr and "100%" in proc.stderr
    quiet = nbdplug("convert", "-O", "raw", src, tmp_path / "out2.raw")
    assert quiet.stderr == ""       # not a terminal: no bar


def test_bounded_memory(tmp_path):
    """A 384 MiB fully written source converts under a 300 MiB address-
    space cap (the interpreter, threads and the read-ahead fit; the
    image would not)."""
    src = str(tmp_path / "full.raw")
    run(["qemu-img", "create", "-q", "-f", "raw", src, "384M"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 384M", src])
    dst = str(tmp_path / "full.out")
    limit = 300 * MiB

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    run(NBDPLUG + ["convert", "-f", "raw", "-O", "raw", src, dst],
        cwd=REPO, preexec_fn=cap)
    qemu_img_compare(src, dst, "raw", "raw")


def one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdplug: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input(tmp_path):
    src = qemu_source(tmp_path, "raw")
    dst = tmp_path / "dst.raw"
    one_line_error(nbdplug("convert", "-O", "raw", tmp_path / "nope", dst,
                           check=False), "No such file")
    one_line_error(nbdplug("convert", "-O", "nosuch", src, dst,
                           check=False), "-O")
    one_line_error(nbdplug("convert", "-c", "-O", "raw", src, dst,
                           check=False), "does not support compression")
    assert not dst.exists()
    dst.write_bytes(b"keep")
    one_line_error(nbdplug("convert", "-O", "raw", src, dst, check=False),
                   "already exists")
    assert dst.read_bytes() == b"keep"
    one_line_error(nbdplug("convert", "-f", "raw", "-O", "raw",
                           "-o", "bogus=1", src, tmp_path / "x.raw",
                           check=False), "bogus")
    assert not os.path.exists(tmp_path / "x.raw")


@pytest.mark.parametrize("out_fmt", ["qcow2", "vmdk", "vpc"])
def test_source_size_not_a_sector_multiple(tmp_path, out_fmt):
    src = tmp_path / "odd.raw"
    src.write_bytes(os.urandom(MiB + 1234))
    dst = tmp_path / f"dst.{out_fmt}"
    nbdplug("convert", "-q", "-f", "raw", "-O", out_fmt, src, dst)
    # Rounded up to whole sectors, as qemu-img converts; the tail is zero.
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           str(dst)]).stdout)
    assert info["virtual-size"] == MiB + 1536
    raw = tmp_path / "back.raw"
    run(["qemu-img", "convert", "-O", "raw", str(dst), str(raw)])
    assert raw.read_bytes() == src.read_bytes() + bytes(302)


def test_failed_convert_leaves_no_files(tmp_path):
    # A source that fails half way (a corrupt L2 entry), converted to a
    # VMDK split into 2 GiB extent files: neither the descriptor nor any
    # extent may be left behind.
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "3G"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k",
         "-c", "write -P 2 2500M 64k", str(src)])
    info = json.loads(run(["qemu-img", "map", "--output=json",
                           str(src)]).stdout)
    host = [e for e in info if e["start"] == 2500 * MiB][0]["offset"]
    with open(src, "r+b") as f:               # find and break that entry
        data = f.read(4 * MiB)
        at = data.find((host | 1 << 63).to_bytes(8, "big"))
        assert at > 0
        f.seek(at)
        f.write(((host + 512) | 1 << 63).to_bytes(8, "big"))
    out = tmp_path / "out"
    out.mkdir()
    proc = nbdplug("convert", "-q", "-f", "qcow2", "-O", "vmdk", "-o",
                   "subformat=twoGbMaxExtentSparse", src, out / "dst.vmdk",
                   check=False)
    one_line_error(proc, "L2 table")
    assert os.listdir(out) == []
