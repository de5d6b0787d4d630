"""qcow2 images written by qemu-img/qemu-io read through nbdkit + our
plugin byte-equal to `qemu-img convert -O raw` of the same image."""

import json
import os

import pytest

from conftest import nbdplug, qemu_img_compare, run, served

KiB, MiB = 1 << 10, 1 << 20


def qemu_io(image, *cmds, fmt="qcow2"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    run(argv + [str(image)])


def to_raw(image, raw, extra=()):
    run(["qemu-img", "convert", *extra, "-O", "raw", str(image), str(raw)])


def assert_reads_like_qemu(image, tmp_path, fmt="qcow2", options=None):
    """Every byte through our plugin equals qemu's raw conversion."""
    raw = tmp_path / (os.path.basename(str(image)) + ".expect.raw")
    extra = []
    if options and "snapshot" in options:
        extra = ["-l", options["snapshot"]]
    to_raw(image, raw, extra)
    plugin_extra = [f"{k}={v}" for k, v in (options or {}).items()]
    with served(str(image), fmt, readonly=True, extra=plugin_extra) as srv:
        qemu_img_compare(srv.uri, str(raw), "raw", "raw")
        h = srv.connect()
        # A second, independent read path: libnbd, unaligned pieces.
        size = h.get_size()
        with open(raw, "rb") as f:
            for off in (0, 511, size // 3 + 7, size - 4097):
                f.seek(off)
                assert h.pread(4097, off) == f.read(4097), off


def workload(cs):
    """qemu-io commands touching whole, partial, zeroed and discarded
    clusters at positions that depend on the cluster size."""
    return [
        f"write -P 0x11 0 {3 * cs}",
        f"write -P 0x22 {5 * cs + 512} 1536",
        f"write -P 0x23 {6 * cs - 1024} 2048",
        f"write -z {8 * cs} {2 * cs}",
        f"write -P 0x33 {8 * cs + cs // 2} 512",
        f"discard {cs} {cs}",
        f"write -P 0x44 {20 * cs} {cs + 4096}",
    ]


@pytest.mark.parametrize("cs", [512, 1024, 4096, 16 * KiB, 64 * KiB,
                                256 * KiB, 2 * MiB])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_cluster_sizes_and_compat(tmp_path, cs, compat):
    image = tmp_path / "img.qcow2"
    size = max(16 * MiB, 32 * cs)
    run(["qemu-img", "create", "-f", "qcow2", "-o",
         f"cluster_size={cs},compat={compat}", str(image), str(size)])
    qemu_io(image, *workload(cs))
    assert_reads_like_qemu(image, tmp_path)


@pytest.mark.parametrize("bits", [1, 2, 8, 16, 32, 64])
def test_refcount_widths(tmp_path, bits):
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-o",
         f"cluster_size=4096,refcount_bits={bits}", str(image), "8M"])
    qemu_io(image, *workload(4096))
    assert_reads_like_qemu(image, tmp_path)


def compressible(path, size):
    """Half patterns (compress well), half random (do not)."""
    with open(path, "wb") as f:
        for i in range(size // (64 * KiB)):
            if i % 2:
                f.write(os.urandom(64 * KiB))
            else:
                f.write(bytes([i % 251]) * (64 * KiB))


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [4096, 64 * KiB])
def test_compressed_clusters(tmp_path, ctype, cs):
    src = tmp_path / "src.raw"
    compressible(src, 4 * MiB)
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o",
         f"compression_type={ctype},cluster_size={cs}", str(src),
         str(image)])
    info = json.loads(run(["qemu-img", "check", "--output=json",
                           str(image)]).stdout)
    assert info.get("compressed-clusters", 0) > 0
    assert_reads_like_qemu(image, tmp_path)


def test_extended_l2_subclusters(tmp_path):
    image = tmp_path / "img.qcow2"
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(8 * MiB))
    run(["qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "raw",
         "-o", "extended_l2=on,cluster_size=64k", str(image)])
    qemu_io(image, "write -P 0x51 4096 2048", "write -P 0x52 65536 4096",
            "write -z 131072 8192", "write -P 0x53 139264 100",
            f"write -P 0x54 {MiB} {64 * KiB}", f"discard {MiB} 16k")
    assert_reads_like_qemu(image, tmp_path)


def test_zero_and_discarded_clusters(tmp_path):
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-o",
         "preallocation=metadata", str(image), "8M"])
    qemu_io(image, "write -P 0x61 0 8M", "write -z 1M 1M",
            "write -z -u 3M 1M", "discard 5M 2M", "write -P 0x62 6M 4k")
    assert_reads_like_qemu(image, tmp_path)


def test_backing_chain_three_deep_mixed_formats(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(6 * MiB))          # smaller than the top
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10",
         "-b", "base.raw", "-F", "raw", str(mid), "8M"])
    qemu_io(mid, "write -P 0x71 1M 1M", "write -z 3M 64k")
    run(["qemu-img", "create", "-f", "qcow2", "-o",
         "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2", str(top)])
    qemu_io(top, "write -P 0x72 1536k 8k", "write -P 0x73 7M 4k",
            "discard 1M 4k")
    assert_reads_like_qemu(top, tmp_path)
    info = json.loads(nbdplug("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "mid.qcow2"
    assert info["backing-image"]["backing-image"]["format"] == "raw"


def test_map_matches_qemu_img_map(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(2 * MiB) + os.urandom(2 * MiB))
    top = tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         str(top), "4M"])
    qemu_io(top, "write -P 1 0 64k", "write -z 1M 64k",
            "write -P 2 2176k 64k")
    ours = json.loads(nbdplug("map", "--output=json", top).stdout)
    theirs = json.loads(run(["qemu-img", "map", "--output=json",
                             str(top)]).stdout)
    assert ours == theirs


def test_info_matches_qemu_img_info(tmp_path):
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-o",
         "compression_type=zstd,extended_l2=on,refcount_bits=64",
         str(image), "1G"])
    ours = json.loads(nbdplug("info", "--output=json", image).stdout)
    theirs = json.loads(run(["qemu-img", "info", "--output=json",
                             str(image)]).stdout)
    for key in ("virtual-size", "cluster-size", "format", "actual-size"):
        assert ours[key] == theirs[key], key
    assert ours["format-specific"] == theirs["format-specific"]


def test_internal_snapshots(tmp_path):
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(image), "4M"])
    qemu_io(image, "write -P 0x81 0 1M")
    run(["qemu-img", "snapshot", "-c", "before", str(image)])
    qemu_io(image, "write -P 0x82 512k 1M", "write -z 3M 64k")
    run(["qemu-img", "snapshot", "-c", "after", str(image)])
    qemu_io(image, "write -P 0x83 0 4k")
    info = json.loads(nbdplug("info", "--output=json", image).stdout)
    assert [s["name"] for s in info["snapshots"]] == ["before", "after"]
    theirs = json.loads(run(["qemu-img", "info", "--output=json",
                             str(image)]).stdout)
    assert info["snapshots"] == theirs["snapshots"]
    assert_reads_like_qemu(image, tmp_path)
    for key in ("before", "2"):      # by name and by id
        assert_reads_like_qemu(image, tmp_path, options={"snapshot": key})


def test_map_past_a_short_backing_file(tmp_path):
    # qemu-img map's depth where the backing file ends: the layer that
    # looked, not the last one.
    (tmp_path / "base.raw").write_bytes(bytes(4 * MiB))
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         str(mid), "8M"])
    run(["qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F",
         "qcow2", str(top), "12M"])
    ours = json.loads(nbdplug("map", "--output=json", top).stdout)
    theirs = json.loads(run(["qemu-img", "map", "--output=json",
                             str(top)]).stdout)
    assert ours == theirs
    assert [e["depth"] for e in ours] == [2, 1, 0]
