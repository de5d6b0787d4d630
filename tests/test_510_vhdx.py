"""VHDX images read through nbdkit and our plugin: those qemu-img writes,
byte for byte against `qemu-img convert -O raw`, and differencing images
(which qemu cannot make or read) built here from the specification,
against a model and against libvhdi."""

import os
import random
import struct
import uuid

import pyvhdi
import pytest

from conftest import nbdplug, run
from nbdplug import ImageError, open_image
from nbdplug.formats.vhdx.log import crc32c
from test_300_cli import assert_one_line_error
from test_500_vhd import assert_served_equals, qemu_raw, read_all

KiB, MiB = 1 << 10, 1 << 20
WRITES = [(0, 64 * KiB, 0x11), (5 * MiB + 512, 3 * MiB, 0x22),
          (20 * MiB, MiB, None), (31 * MiB, MiB, 0x33)]


def qemu_vhdx(path, size=32 * MiB, opts="", writes=WRITES):
    run(["qemu-img", "create", "-q", "-f", "vhdx", *(["-o", opts] if opts
                                                      else []),
         str(path), str(size)])
    cmds = []
    for off, n, byte in writes:
        cmds += ["-c", f"write -z {off} {n}" if byte is None
                 else f"write -P {byte} {off} {n}"]
    if cmds:
        run(["qemu-io", "-f", "vhdx", *cmds, str(path)])


def test_crc32c_known_answers():
    assert crc32c(b"123456789") == 0xE3069283       # the check value
    assert crc32c(bytes(32)) == 0x8A9136AA          # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283


@pytest.mark.parametrize("opts", ["subformat=dynamic",
                                  "subformat=fixed",
                                  "subformat=dynamic,block_size=1M",
                                  "subformat=dynamic,block_state_zero=off"])
@pytest.mark.parametrize("content", ["empty", "partial", "full"])
def test_qemu_images_read_byte_equal(tmp_path, opts, content):
    path = tmp_path / "disk.vhdx"
    if content == "full":
        src = tmp_path / "src.raw"
        src.write_bytes(random.Random(1).randbytes(32 * MiB))
        run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", opts,
             str(src), str(path)])
    else:
        qemu_vhdx(path, opts=opts, writes=WRITES if content == "partial"
                  else [])
    expected = qemu_raw(path, "vhdx")
    assert read_all(path, "vhdx") == expected
    if content == "partial":
        assert_served_equals(path, expected, tmp_path, "vhdx")


def test_info(tmp_path):
    path = tmp_path / "disk.vhdx"
    qemu_vhdx(path, opts="block_size=2M")
    info = nbdplug("info", "--output=json", path).stdout
    assert '"format": "vhdx"' in info and '"cluster-size": 2097152' in info
    assert '"creator": "QEMU v' in info


def test_writable_open_refused(tmp_path):
    path = tmp_path / "disk.vhdx"
    qemu_vhdx(path, writes=[])
    with pytest.raises(ImageError, match="read-only"):
        open_image(str(path), "vhdx", readonly=False)
    proc = nbdplug("serve", "-f", "vhdx", path, check=False)
    assert_one_line_error(proc, "disk.vhdx", "read-only")


# --- a VHDX builder, from [MS-VHDX] ----------------------------------------

GUIDS = {
    "bat": "2DC27766-F623-4200-9D64-115E9BFD4A08",
    "metadata": "8B7CA206-4790-4B9A-B8FE-575F050F886E",
    "file parameters": "CAA16737-FA36-4D43-B3B6-33F0AA44E76B",
    "virtual disk size": "2FA54224-CD1B-4876-B211-5DBED83BF4B8",
    "virtual disk id": "BECA12AB-B2E6-4523-93EF-C309E000C746",
    "logical sector size": "8141BF1D-A96F-4709-BA47-F233A8FAAB5F",
    "physical sector size": "CDA348C7-445D-4471-9CC9-E9885251C556",
    "parent locator": "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C",
    "vhdx locator type": "B04AEFB7-D19E-4A81-B789-25B8E9445913",
}


def guid(name):
    return uuid.UUID(GUIDS[name]).bytes_le


def with_crc(buf, at=4):
    buf = bytearray(buf)
    buf[at:at + 4] = bytes(4)
    struct.pack_into("<I", buf, at, crc32c(buf))
    return bytes(buf)


def header(seq, data_write_guid, log_guid=bytes(16)):
    raw = struct.pack("<4sIQ16s16s16sHHIQ", b"head", 0, seq,
                      uuid.uuid4().bytes_le, data_write_guid, log_guid, 0, 1,
                      MiB, MiB)
    return with_crc(raw.ljust(4 * KiB, b"\0"))


def locator_item(pairs):
    """A parent locator metadata item of UTF-16LE key/value pairs."""
    head = struct.pack("<16sHH", guid("vhdx locator type"), 0, len(pairs))
    table, blob = b"", b""
    base = len(head) + 12 * len(pairs)
    for key, value in pairs.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        table += struct.pack("<IIHH", base + len(blob),
                             base + len(blob) + len(k), len(k), len(v))
        blob += k + v
    return head + table + blob


def build_vhdx(path, size, blocks, block_size=MiB, lss=512, parent=None):
    """Write a VHDX: `blocks` maps a payload block number to ("full",
    data), ("partial", data, sectors present) or ("zero",); `parent`
    gives the parent locator pairs (a differencing disk).  Regions: log
    at 1 MiB, BAT at 2 MiB, metadata at 3 MiB, blocks from 4 MiB."""
    chunk_ratio = (1 << 23) * lss // block_size
    nblocks = -(-size // block_size)
    if parent:
        entries = -(-nblocks // chunk_ratio) * (chunk_ratio + 1)
    else:
        entries = nblocks + (nblocks - 1) // chunk_ratio
    bat = [0] * entries
    f = bytearray(4 * MiB)
    f[:8] = b"vhdxfile"
    f[8:8 + 26] = "nbdplug tests".encode("utf-16-le")
    data_write_guid = uuid.uuid4().bytes_le
    f[64 * KiB:68 * KiB] = header(1, data_write_guid)
    f[128 * KiB:132 * KiB] = header(2, data_write_guid)
    regions = struct.pack("<4sIII", b"regi", 0, 2, 0)
    regions += struct.pack("<16sQII", guid("bat"), 2 * MiB, MiB, 1)
    regions += struct.pack("<16sQII", guid("metadata"), 3 * MiB, MiB, 1)
    regions = with_crc(regions.ljust(64 * KiB, b"\0"))
    f[192 * KiB:256 * KiB] = f[256 * KiB:320 * KiB] = regions
    items = [("file parameters", struct.pack("<II", block_size,
                                             2 if parent else 0)),
             ("virtual disk size", struct.pack("<Q", size)),
             ("virtual disk id", uuid.uuid4().bytes_le),
             ("logical sector size", struct.pack("<I", lss)),
             ("physical sector size", struct.pack("<I", 4096))]
    if parent:
        items.append(("parent locator", locator_item(parent)))
    table = struct.pack("<8sHH20s", b"metadata", 0, len(items), bytes(20))
    at = 64 * KiB
    for name, value in items:
        table += struct.pack("<16sIIII", guid(name), at, len(value),
                             4 if name != "parent locator" else 6, 0)
        f[3 * MiB + at:3 * MiB + at + len(value)] = value
        at += len(value)
    f[3 * MiB:3 * MiB + len(table)] = table
    bitmaps = {}
    for block, spec in sorted(blocks.items()):
        index = block + block // chunk_ratio
        if spec[0] == "zero":
            bat[index] = 2
            continue
        offset = len(f)
        f += spec[1]
        bat[index] = 7 if spec[0] == "partial" else 6
        bat[index] |= offset // MiB << 20
        if spec[0] == "partial":
            chunk = block // chunk_ratio
            bitmap = bitmaps.setdefault(chunk, bytearray(MiB))
            first = block % chunk_ratio * (block_size // lss)
            for s in spec[2]:
                bitmap[(first + s) >> 3] |= 1 << ((first + s) & 7)
    for chunk, bitmap in bitmaps.items():
        bat[chunk * (chunk_ratio + 1) + chunk_ratio] = \
            6 | (len(f) // MiB) << 20
        f += bitmap
    struct.pack_into(f"<{entries}Q", f, 2 * MiB, *bat)
    path.write_bytes(f)
    return data_write_guid


# --- differencing images ---------------------------------------------------

@pytest.fixture
def parent(tmp_path):
    """A qemu-written dynamic VHDX with 1 MiB blocks, its data write GUID
    and its bytes."""
    path = tmp_path / "base" / "parent.vhdx"
    path.parent.mkdir()
    qemu_vhdx(path, 8 * MiB, "block_size=1M",
              writes=[(0, 8 * MiB, 0x5A)])
    dw = struct.unpack_from("<16s", current_header(path), 32)[0]
    return path, dw, qemu_raw(path, "vhdx")


def current_header(path):
    data = path.read_bytes()
    h1, h2 = data[64 * KiB:68 * KiB], data[128 * KiB:132 * KiB]
    return max(h1, h2, key=lambda h: struct.unpack_from("<Q", h, 8)[0])


def linkage(dw):
    return "{" + str(uuid.UUID(bytes_le=dw)) + "}"


def child_of(tmp_path, parent, **locator):
    """A differencing child with one block of each kind; returns its path
    and the model of what it reads as."""
    path_, dw, parent_bytes = parent
    rng = random.Random(3)
    full, partial = rng.randbytes(MiB), rng.randbytes(MiB)
    present = sorted(rng.sample(range(2048), 700)) + list(range(8, 24))
    blocks = {1: ("full", full), 2: ("partial", partial, present),
              4: ("zero",)}
    pairs = {"parent_linkage": linkage(dw),
             "relative_path": ".\\base\\parent.vhdx"}
    pairs.update(locator)
    path = tmp_path / "child.vhdx"
    build_vhdx(path, 8 * MiB, blocks, parent={k: v for k, v in
                                              pairs.items() if v})
    model = bytearray(parent_bytes)
    model[MiB:2 * MiB] = full
    for s in present:
        model[2 * MiB + s * 512:2 * MiB + (s + 1) * 512] = \
            partial[s * 512:(s + 1) * 512]
    model[4 * MiB:5 * MiB] = bytes(MiB)
    return path, bytes(model)


def test_differencing_reads_as_the_model(tmp_path, parent):
    child, model = child_of(tmp_path, parent)
    assert read_all(child, "vhdx") == model
    assert_served_equals(child, model, tmp_path, "vhdx")
    # libvhdi agrees, given the parent by hand, but for the zero block:
    # it reads the parent there (the specification says zeros).
    f, p = pyvhdi.file(), pyvhdi.file()
    f.open(str(child))
    p.open(str(parent[0]))
    f.set_parent(p)
    f.seek(0)
    theirs = f.read(8 * MiB)
    assert theirs[4 * MiB:5 * MiB] == parent[2][4 * MiB:5 * MiB]
    assert theirs[:4 * MiB] + theirs[5 * MiB:] == \
        model[:4 * MiB] + model[5 * MiB:]
    f.close()
    p.close()
    # qemu refuses differencing VHDX images.
    assert run(["qemu-img", "info", "-f", "vhdx", str(child)],
               check=False).returncode != 0


def test_differencing_map_names_both_layers(tmp_path, parent):
    child, _ = child_of(tmp_path, parent)
    with open_image(str(child), "vhdx") as disk:
        runs = disk.map(disk.size, 0)
        assert disk.backing_name == "./base/parent.vhdx"
    depths = {r.depth for r in runs if r.data}
    assert depths == {0, 1}
    assert any(r.zero and r.depth == 0 for r in runs)     # the zero block


def test_absolute_path_when_the_relative_one_fails(tmp_path, parent):
    absolute = "C:" + str(parent[0]).replace("/", "\\")
    child, model = child_of(tmp_path, parent, relative_path=".\\gone.vhdx",
                            absolute_win32_path=absolute)
    assert read_all(child, "vhdx") == model


def test_parent_linkage2_is_accepted(tmp_path, parent):
    child, model = child_of(tmp_path, parent,
                            parent_linkage=linkage(uuid.uuid4().bytes_le),
                            parent_linkage2=linkage(parent[1]))
    assert read_all(child, "vhdx") == model


def test_parent_with_another_data_write_guid_is_refused(tmp_path, parent):
    child, _ = child_of(tmp_path, parent,
                        parent_linkage=linkage(uuid.uuid4().bytes_le))
    proc = nbdplug("info", child, check=False)
    assert_one_line_error(proc, "child.vhdx", "data write GUID differs")


def test_4k_logical_sectors(tmp_path):
    """Blocks of a disk with 4096-byte logical sectors (qemu writes 512)."""
    data = random.Random(4).randbytes(2 * MiB)
    path = tmp_path / "disk.vhdx"
    build_vhdx(path, 6 * MiB, {0: ("full", data[:MiB]),
                               3: ("full", data[MiB:])}, lss=4096)
    model = data[:MiB] + bytes(2 * MiB) + data[MiB:] + bytes(2 * MiB)
    assert read_all(path, "vhdx") == model
    f = pyvhdi.file()
    f.open(str(path))
    f.seek(0)
    assert f.read(6 * MiB) == model
    f.close()
    assert os.path.getsize(path) == 6 * MiB
