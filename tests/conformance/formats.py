"""The format fixtures of the conformance suite: one row a format.

Every row builds the same guest disk, as far as its format can hold it,
with the tool its users would use (qemu-img and qemu-io; nbdplug where
qemu has no such format):

    [0, 1M)         data, in the top image
    [1M, 2M)        left alone: a hole, or the backing file's data
    [2M, 3M)        zeroed in the top image (over backing data)
    [3M, 3.5M)      data, in the top image
    [4M, 6M)        the backing file's data only (a hole without one)
    [6M, 6M + 64k)  compressed data, where the format compresses

The qcow2-moving row is the qcow2 row's disk as a move in progress
(`nbdplug migrate`) sees it: the same bytes, still held by the source.

A row also says what its format can do, so a test that needs a write
asserts the clear refusal where there is none.  Adding a format is
adding a row.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import typing

MiB = 1 << 20
SIZE = 8 * MiB
REFERENCE = "reference.raw"

TOP = [("write -P 0xa1 0 1M",), ("write -z 2M 1M",),
       ("write -P 0xb2 3M 512k",)]


def compressed(cluster):
    """Compressed writes of [6M, 6M + 64k), a cluster a write (as qemu
    writes compressed data)."""
    return [(f"write -c -P 0xc3 {6 * MiB + at} {cluster}",)
            for at in range(0, 64 << 10, cluster)]
BASE = [("write -P 0x11 1280k 768k",), ("write -P 0x12 2M 1M",),
        ("write -P 0x13 4M 2M",)]


class Row(typing.NamedTuple):
    name: str               # the test id
    fmt: str                # nbdplug's (and qemu-img's) format name
    build: typing.Callable  # (directory) -> image name
    qemu_reads: bool        # qemu-img is the reference reader; else the
                            # builder leaves the guest bytes in REFERENCE
    writable: bool = True
    checks: bool = True     # nbdplug check knows the format
    qemu_checks: bool = False   # and so does qemu-img check
    create_options: str = ""    # -o as qemu-img create takes it too

    def __str__(self):
        return self.name


def _run(argv):
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, (argv, proc.stderr)
    return proc.stdout


def qemu_io(image, fmt, commands):
    argv = ["qemu-io", "-f", fmt]
    for (command,) in commands:
        argv += ["-c", command]
    _run(argv + [image])


def _qemu_image(fmt, top_options="", backing=False, cluster=None,
                compress_base=False):
    """A builder: the guest disk above in `fmt`, made by qemu; compressed
    clusters of `cluster` bytes in the top image, or in the base with
    `compress_base` (qemu writes no compressed qcow cluster over a
    backing file)."""
    def build(directory):
        top = os.path.join(directory, f"top.{fmt}")
        argv = ["qemu-img", "create", "-q", "-f", fmt]
        if top_options:
            argv += ["-o", top_options]
        if backing:
            base = os.path.join(directory, f"base.{fmt}")
            _run(["qemu-img", "create", "-q", "-f", fmt, base, str(SIZE)])
            qemu_io(base, fmt, BASE + (compressed(cluster)
                                       if compress_base else []))
            argv += ["-b", f"base.{fmt}", "-F", fmt]
        _run(argv + [top, str(SIZE)])
        qemu_io(top, fmt, TOP + (compressed(cluster)
                                 if cluster and not compress_base else []))
        return top
    return build


def _ram(directory):
    """A RAM disk (qemu cannot read the format) holding the top image's
    data, written through our driver; the same bytes, with holes where
    nothing was written, in REFERENCE."""
    from nbdplug import create_image, open_image
    reference = os.path.join(directory, REFERENCE)
    data = [(0, b"\xa1" * MiB), (3 * MiB, b"\xb2" * (MiB // 2))]
    with open(reference, "wb") as f:
        f.truncate(SIZE)
        for offset, chunk in data:
            f.seek(offset)
            f.write(chunk)
    name = ram_name(directory)
    create_image(f"ram:{name}", "ram", SIZE)
    with open_image(f"ram:{name}", "ram", readonly=False) as disk:
        for offset, chunk in data:
            disk.pwrite(chunk, offset)
        disk.flush()
    return f"ram:{name}"


_sources = []           # (server, its directory, NBDPLUG_STATE_DIR before)


def _moving(directory):
    """A qcow2 image in the middle of a move (`nbdplug migrate start`):
    its first MiB copied on read, every other cluster still remote, read
    from an NBD export of the qcow2 row's guest disk (nbdkit and our
    plugin on a Unix socket, for the session), copied on read and stored
    by whoever opens it writable.
    The fill's rate is one byte a second, so a writable open copies
    its first batch of clusters and then waits: the rest stays remote.
    The host key that vouches for the source lives beside the source, so
    every process of the session needs NBDPLUG_STATE_DIR, set here until
    stop_sources()."""
    from migration import SourceServer
    source_dir = tempfile.mkdtemp(prefix="nbdplug-conformance-src.")
    before = os.environ.get("NBDPLUG_STATE_DIR")
    os.environ["NBDPLUG_STATE_DIR"] = os.path.join(source_dir, "state")
    image = _qemu_image("qcow2", backing=True, cluster=64 << 10)(
        source_dir)
    source = SourceServer(image, "qcow2")
    source.start()
    _sources.append((source, source_dir, before))
    local = os.path.join(directory, "moving.qcow2")
    _run([sys.executable, "-m", "nbdplug.cli", "migrate", "start",
          "--no-wait", "--rate", "1", source.uri, local])
    from nbdplug import open_image
    with open_image(local, "qcow2", readonly=False,
                    options={"fill": False}) as disk:
        disk.read(MiB, 0)                   # copied on read: local now
    return local


def stop_sources():
    while _sources:
        source, source_dir, before = _sources.pop()
        source.stop()
        shutil.rmtree(source_dir, ignore_errors=True)
        if before is None:
            os.environ.pop("NBDPLUG_STATE_DIR", None)
        else:
            os.environ["NBDPLUG_STATE_DIR"] = before


ROWS = [
    Row("raw", "raw", _qemu_image("raw"), True, checks=False),
    Row("qcow2", "qcow2", _qemu_image("qcow2", backing=True,
                                      cluster=64 << 10), True,
        qemu_checks=True,
        create_options="cluster_size=64k,extended_l2=off,"
                       "lazy_refcounts=off,compat=1.1"),
    Row("qcow", "qcow", _qemu_image("qcow", backing=True, cluster=4096,
                                    compress_base=True), True),
    Row("vmdk", "vmdk", _qemu_image("vmdk", backing=True), True,
        qemu_checks=True,
        create_options="subformat=monolithicSparse,zeroed_grain=on"),
    Row("vpc", "vpc", _qemu_image("vpc"), True,
        create_options="subformat=dynamic,force_size=off"),
    Row("vhdx", "vhdx", _qemu_image("vhdx"), True, writable=False,
        checks=False, qemu_checks=True),
    Row("ram", "ram", _ram, False, checks=False),
    Row("qcow2-moving", "qcow2", _moving, True, qemu_checks=True,
        create_options="cluster_size=64k,extended_l2=off,"
                       "lazy_refcounts=off,compat=1.1"),
]

WRITABLE = [r for r in ROWS if r.writable]


def copy_image(image, directory, into):
    """A private copy of the fixture `image` (with its backing file) in
    `into`; returns its name.  A RAM disk is copied to a new one."""
    if image.startswith("ram:"):
        from nbdplug import create_image, open_image
        name = ram_name(into)
        create_image(f"ram:{name}", "ram", SIZE)
        with open_image(image, "ram") as src, \
                open_image(f"ram:{name}", "ram", readonly=False) as dst:
            for run in src.map(SIZE, 0):
                if run.data:
                    dst.pwrite(src.read(run.length, run.offset), run.offset)
            dst.flush()
        return f"ram:{name}"
    for entry in os.listdir(directory):       # holes stay holes
        _run(["cp", "-p", "--sparse=always", os.path.join(directory, entry),
              into])
    return os.path.join(into, os.path.basename(image))


def ram_name(directory):
    """A RAM disk name no other test run on this host uses (RAM disks
    are host-wide: pytest's directory names repeat across runs)."""
    return f"conformance-{os.getpid()}-{os.path.basename(directory)}"


def remove_ram(image):
    if image.startswith("ram:"):
        from nbdplug.errors import UsageError
        from nbdplug.formats.ram import remove
        try:
            remove(image)
        except UsageError:
            pass            # gone already (a cleaner on a shared machine)
