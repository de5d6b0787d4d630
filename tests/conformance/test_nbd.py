"""Every format served by nbdkit and the plugin, through real clients:
reads (qemu-img compare, nbdcopy with block status), block status
(nbdinfo --map and qemu-img map over NBD against qemu-img map of the
file), every write callback (pwrite, FUA, zero with and without
may_trim, trim, flush) through qemu-io, and read-only refusals."""

import hashlib
import json
import os

import pytest

from conformance.formats import ROWS, WRITABLE, MiB
from conftest import (nbdplug, qemu_img_check_clean, qemu_img_compare, run,
                      served)

HOLE, ZERO = 1, 2       # NBD base:allocation flags


def flags_of_qemu_map(entries):
    """qemu-img map --output=json entries as NBD block status would say
    them: (offset, length, flags) merged where the flags agree."""
    return _merge((e["start"], e["length"],
                   (0 if e["data"] else HOLE) | (ZERO if e["zero"] else 0))
                  for e in entries)


def _merge(runs):
    out = []
    for offset, length, flags in runs:
        if out and out[-1][2] == flags and \
                out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((offset, length, flags))
    return out


def qemu_map(fixture):
    """qemu-img's map of the fixture (for a format qemu cannot read, of
    the raw file it was built from)."""
    row = fixture.row
    image, fmt = (fixture.image, row.fmt) if row.qemu_reads else \
        (fixture.reference, "raw")
    return json.loads(run(["qemu-img", "map", "-f", fmt, "--output=json",
                           image]).stdout)


def test_reads_equal_the_reference(fixture):
    with served(fixture.image, fixture.row.fmt, readonly=True) as srv:
        qemu_img_compare(fixture.reference, srv.uri, "raw", "raw")


def test_nbdcopy_with_block_status(fixture, tmp_path):
    out = tmp_path / "copy.raw"
    with served(fixture.image, fixture.row.fmt, readonly=True) as srv:
        run(["nbdcopy", srv.uri, str(out)])
    assert out.read_bytes() == fixture.reference_bytes()


def test_block_status_is_qemu_map(fixture):
    expect = flags_of_qemu_map(qemu_map(fixture))
    with served(fixture.image, fixture.row.fmt, readonly=True) as srv:
        ours = json.loads(run(["nbdinfo", "--map", "--json",
                               srv.uri]).stdout)
        over_nbd = json.loads(run(["qemu-img", "map", "-f", "raw",
                                   "--output=json", srv.uri]).stdout)
    assert _merge((e["offset"], e["length"], e["type"])
                  for e in ours) == expect
    assert flags_of_qemu_map(over_nbd) == expect


# Each write callback once; the final bytes are defined everywhere (a
# trimmed range is written again), so a model can say them.
WRITES = [
    ("write -P 0x5a 768k 512k", lambda m: _fill(m, 768 << 10, 512 << 10,
                                                0x5a)),
    ("write -f -P 0x5b 1536k 64k", lambda m: _fill(m, 1536 << 10, 64 << 10,
                                                   0x5b)),       # FUA
    ("write -z 3M 128k", lambda m: _fill(m, 3 * MiB, 128 << 10, 0)),
    ("write -z -u 5M 256k", lambda m: _fill(m, 5 * MiB, 256 << 10, 0)),
    ("discard 7M 64k", lambda m: None),
    ("write -P 0x5c 7M 64k", lambda m: _fill(m, 7 * MiB, 64 << 10, 0x5c)),
    ("flush", lambda m: None),
]


def _fill(model, offset, length, byte):
    model[offset:offset + length] = bytes([byte]) * length


@pytest.mark.parametrize("row", WRITABLE, ids=str)
def test_every_write_callback(fixture, private, tmp_path):
    row = fixture.row
    model = bytearray(fixture.reference_bytes())
    argv = ["qemu-io", "-f", "raw"]
    for command, apply in WRITES:
        argv += ["-c", command]
        apply(model)
    expect = tmp_path / "model.raw"
    expect.write_bytes(model)
    with served(private, row.fmt) as srv:
        run(argv + [srv.uri])
        qemu_img_compare(str(expect), srv.uri, "raw", "raw")
        ours = json.loads(run(["nbdinfo", "--map", "--json",
                               srv.uri]).stdout)
    # Zeroed ranges read as zeros in the block status too.
    for offset, length in ((3 * MiB, 128 << 10), (5 * MiB, 256 << 10)):
        for e in ours:
            if e["offset"] < offset + length and \
                    offset < e["offset"] + e["length"]:
                assert e["type"] & ZERO or e["type"] == 0, e
    # Afterwards the file holds it, and checks clean.
    with served(private, row.fmt, readonly=True) as srv:
        qemu_img_compare(str(expect), srv.uri, "raw", "raw")
    if row.qemu_reads:
        qemu_img_compare(str(expect), private, "raw", row.fmt)
    if row.qemu_checks:
        qemu_img_check_clean(private)
    if row.checks:
        assert nbdplug("check", "-f", row.fmt, private).returncode == 0


def _digest(image):
    h = hashlib.sha256()
    for name in sorted(os.listdir(os.path.dirname(image))):
        with open(os.path.join(os.path.dirname(image), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def test_read_only_export_refuses_writes(fixture, private):
    import nbd
    if private.startswith("ram:"):
        before = None
    else:
        before = _digest(private)
    with served(private, fixture.row.fmt, readonly=True) as srv:
        h = srv.connect(strict=False)       # the server itself refuses
        for call in (lambda: h.pwrite(b"x" * 4096, 0),
                     lambda: h.zero(4096, 0),
                     lambda: h.trim(4096, 0)):
            with pytest.raises(nbd.Error) as e:
                call()
            assert e.value.errno in ("EPERM", "EROFS"), e.value
    if before is not None:
        assert _digest(private) == before


@pytest.mark.parametrize("row", [r for r in ROWS if not r.writable],
                         ids=str)
def test_format_that_cannot_write_refuses_clearly(fixture):
    proc = nbdplug("serve", "--foreground", "-f", fixture.row.fmt,
                   "--writable", "--socket", "/nonexistent/x.sock",
                   fixture.image, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "read-only" in proc.stderr, \
        proc.stderr
    assert "Traceback" not in proc.stderr
