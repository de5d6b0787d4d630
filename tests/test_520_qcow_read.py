"""qcow v1 images made by qemu-img and qemu-io, read through nbdkit and
our plugin: every byte equals `qemu-img convert -O raw`, and the
allocation map equals `qemu-img map`."""

import json
import random

import pytest

from conftest import nbdplug, qemu_img_compare, run, served

MiB = 1 << 20


def qemu_raw(image, tmp_path):
    """The guest bytes as qemu reads them."""
    out = tmp_path / "qemu.raw"
    run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)])
    data = out.read_bytes()
    out.unlink()
    return data


def served_bytes(image):
    """The guest bytes as nbdkit with our plugin serves them."""
    with served(str(image), "qcow", readonly=True) as srv:
        return run(["nbdcopy", srv.uri, "-"], text=False).stdout


def qemu_io(image, *commands, fmt="qcow"):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    run(argv + [str(image)])


def compressible(length, seed):
    """Runs of a few byte values: deflate shrinks them, but not to
    nothing, and each cluster differs."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < length:
        out += bytes([rng.randrange(4)]) * rng.randrange(1, 64)
    return bytes(out[:length])


def _empty(d):
    run(["qemu-img", "create", "-f", "qcow", str(d / "t.qcow"),
         str(10 * MiB + 3 * 512)])
    return d / "t.qcow"


def _partly_written(d):
    image = _empty(d)
    # Unaligned sectors, a write across the 2 MiB an L2 table maps, the
    # last sector of the disk, and an overwrite.
    qemu_io(image, "write -P 0x11 512 7k", "write -P 0x22 2044k 12k",
            "write -P 0x33 5000k 1000k", "write -P 0x44 10240k 1536",
            "write -P 0x55 4k 512")
    return image


def _fully_written(d):
    src = d / "src.raw"
    src.write_bytes(random.Random(1).randbytes(6 * MiB + 512))
    run(["qemu-img", "convert", "-O", "qcow", str(src), str(d / "t.qcow")])
    return d / "t.qcow"


def _compressed(d):
    # Compressible, incompressible (stored plain) and zero (unallocated)
    # clusters, from qemu's own compressing writer.
    src = d / "src.raw"
    src.write_bytes(compressible(3 * MiB, 2)
                    + random.Random(3).randbytes(MiB) + bytes(MiB)
                    + compressible(MiB, 4))
    # qemu-img 7.2 writes the whole image, then exits 1 when its closing
    # zero-length compressed write fails on qcow: check the image instead.
    run(["qemu-img", "convert", "-c", "-O", "qcow", str(src),
         str(d / "t.qcow")], check=False)
    qemu_img_compare(str(src), str(d / "t.qcow"), "raw", "qcow")
    return d / "t.qcow"


def _raw_backing(d):
    base = d / "base.raw"
    base.write_bytes(random.Random(5).randbytes(4 * MiB)
                     + bytes(2 * MiB) + random.Random(6).randbytes(2 * MiB))
    # Larger than its backing file: past its end the guest reads zeros.
    run(["qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw",
         str(d / "t.qcow"), str(10 * MiB)])
    # (qemu syncs every cluster it allocates: keep its writes small.)
    qemu_io(d / "t.qcow", "write -P 0x66 1000 3000",
            "write -P 0x77 2047k 64k", "write -P 0x88 9M 4k")
    return d / "t.qcow"


def _cluster_size(bits):
    def make(d):
        nbdplug("create", "-q", "-f", "qcow", "-o",
                f"cluster_size={1 << bits}", d / "t.qcow", "9M")
        qemu_io(d / "t.qcow", "write -P 0x99 0 100k",
                "write -P 0xaa 4000k 150k", "write -P 0xbb 9215k 512")
        return d / "t.qcow"
    return make


IMAGES = {
    "empty": _empty,
    "partly-written": _partly_written,
    "fully-written": _fully_written,
    "compressed": _compressed,
    "raw-backing": _raw_backing,
    "cluster-512": _cluster_size(9),
    "cluster-64k": _cluster_size(16),
}


@pytest.mark.parametrize("kind", IMAGES)
def test_served_bytes_equal_qemu(kind, tmp_path):
    image = IMAGES[kind](tmp_path)
    expect = qemu_raw(image, tmp_path)
    got = served_bytes(image)
    assert len(got) == len(expect)
    if got != expect:
        first = next(i for i in range(len(got)) if got[i] != expect[i])
        pytest.fail(f"{kind}: first difference at byte {first}")


@pytest.mark.parametrize("kind", ["partly-written", "fully-written",
                                  "compressed", "raw-backing"])
def test_map_equals_qemu_img_map(kind, tmp_path):
    image = IMAGES[kind](tmp_path)
    ours = json.loads(nbdplug("map", "-f", "qcow", "--output=json",
                              image).stdout)
    theirs = json.loads(run(["qemu-img", "map", "--output=json",
                             str(image)]).stdout)
    assert ours == theirs


def test_nbd_extents_report_unallocated_as_holes(tmp_path):
    image = _partly_written(tmp_path)
    theirs = json.loads(run(["qemu-img", "map", "--output=json",
                             str(image)]).stdout)
    with served(str(image), "qcow", readonly=True) as srv:
        out = run(["nbdinfo", "--map", "--json", srv.uri]).stdout
    extents = [(e["offset"], e["length"], e["type"])
               for e in json.loads(out)]
    expect = []
    for e in theirs:                    # NBD merges runs of one type
        kind = 0 if e["data"] else 3
        if expect and expect[-1][2] == kind:
            expect[-1] = (expect[-1][0], expect[-1][1] + e["length"], kind)
        else:
            expect.append((e["start"], e["length"], kind))
    assert extents == expect
    assert {kind for _, _, kind in extents} == {0, 3}


def test_info_names_cluster_size_and_backing(tmp_path):
    image = _raw_backing(tmp_path)
    info = json.loads(nbdplug("info", "-f", "qcow", "--output=json",
                              image).stdout)
    assert info["format"] == "qcow"
    assert info["virtual-size"] == 10 * MiB
    assert info["cluster-size"] == 512          # qemu's choice with backing
    assert info["backing-filename"] == "base.raw"
    assert info["backing-image"]["format"] == "raw"
