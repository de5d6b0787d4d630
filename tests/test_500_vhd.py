"""VHD (qemu's "vpc") images that qemu-img wrote, read through nbdkit and
our plugin, byte for byte against `qemu-img convert -O raw`; block status
against `qemu-img map`; the virtual size against qemu's."""

import json
import struct

import pytest

from conftest import qemu_img_compare, run, served
from nbdplug import open_image
from nbdplug.formats.vhd import structs as vhd

MiB = 1 << 20
# Writes that leave blocks empty, partial and full, and one that ends at
# the last sector of the disk.
WRITES = [(0, 64 * 1024, 0x11), (3 * MiB + 512, 2 * MiB + 1536, 0x22),
          (9 * MiB, 123 * 512, 0x33)]


def qemu_vhd(path, size, subformat="dynamic", force_size=True,
             writes=WRITES):
    """A VHD written by qemu-img and qemu-io; returns its virtual size."""
    opts = f"subformat={subformat}" + (",force_size=on" if force_size
                                       else "")
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", opts, str(path),
         str(size)])
    vsize = qemu_size(path)
    cmds = []
    for off, n, byte in writes:
        if off >= vsize:
            continue
        n = min(n, vsize - off)
        cmds += ["-c", f"write -P {byte} {off} {n}"]
    if cmds:
        run(["qemu-io", "-f", "vpc", *cmds, str(path)])
    return vsize


def qemu_size(path, fmt="vpc"):
    return json.loads(run(["qemu-img", "info", "-f", fmt, "--output=json",
                           str(path)]).stdout)["virtual-size"]


def qemu_raw(path, fmt="vpc"):
    """What qemu reads from the image."""
    out = str(path) + ".qemu.raw"
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), out])
    with open(out, "rb") as f:
        return f.read()


def read_all(path, fmt="vpc"):
    """What our driver reads from the image."""
    with open_image(str(path), fmt) as disk:
        buf = bytearray(disk.size)
        disk.pread(memoryview(buf), 0)
    return bytes(buf)


def assert_served_equals(path, raw_bytes, tmp_path, fmt="vpc"):
    ref = tmp_path / "expected.raw"
    ref.write_bytes(raw_bytes)
    with served(str(path), fmt, readonly=True) as srv:
        qemu_img_compare(srv.uri, str(ref), "raw", "raw")
        h = srv.connect()
        assert h.get_size() == len(raw_bytes)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("content", ["empty", "partial", "full"])
def test_qemu_images_read_byte_equal(tmp_path, subformat, content):
    path = tmp_path / "disk.vhd"
    size = 10 * MiB
    if content == "full":
        src = tmp_path / "src.raw"
        src.write_bytes(bytes(range(256)) * (size // 256))
        run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
             f"subformat={subformat},force_size=on", str(src), str(path)])
    else:
        qemu_vhd(path, size, subformat,
                 writes=WRITES if content == "partial" else [])
    expected = qemu_raw(path)
    assert len(expected) == size
    assert read_all(path) == expected
    assert_served_equals(path, expected, tmp_path)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_chs_sized_images_agree_with_qemu(tmp_path, subformat):
    """Without force_size qemu rounds the size to a CHS geometry and
    records that size in the footer; we report the same."""
    path = tmp_path / "disk.vhd"
    vsize = qemu_vhd(path, 10 * MiB, subformat, force_size=False)
    assert vsize != 10 * MiB
    expected = qemu_raw(path)
    with open_image(str(path), "vpc") as disk:
        assert disk.size == vsize
    assert read_all(path) == expected


@pytest.mark.parametrize("creator,by_chs", [(b"vpc ", True),
                                            (b"win ", False)])
def test_size_from_chs_geometry_as_qemu(tmp_path, creator, by_chs):
    """Virtual PC images ("vpc " creator) are sized by their CHS
    geometry, Hyper-V's ("win ") by the footer's current_size: as qemu
    reads them, so both read the same bytes."""
    path = tmp_path / "disk.vhd"
    qemu_vhd(path, 10 * MiB)
    patch_footers(path, creator_application=creator, cylinders=300,
                  heads=4, sectors_per_track=17)
    size = 300 * 4 * 17 * 512 if by_chs else 10 * MiB
    assert qemu_size(path) == size
    with open_image(str(path), "vpc") as disk:
        assert disk.size == size
    assert read_all(path) == qemu_raw(path)


def test_map_matches_qemu_img(tmp_path):
    path = tmp_path / "disk.vhd"
    qemu_vhd(path, 16 * MiB)
    from conftest import nbdplug
    ours = json.loads(nbdplug("map", "-f", "vpc", "--output=json",
                              path).stdout)
    theirs = json.loads(run(["qemu-img", "map", "-f", "vpc",
                             "--output=json", str(path)]).stdout)
    assert ours == theirs
    assert any(e["data"] for e in ours) and any(not e["data"] for e in ours)


def test_info_matches_qemu_img(tmp_path):
    path = tmp_path / "disk.vhd"
    qemu_vhd(path, 16 * MiB)
    from conftest import nbdplug
    ours = json.loads(nbdplug("info", "--output=json", path).stdout)
    theirs = json.loads(run(["qemu-img", "info", "--output=json",
                             str(path)]).stdout)
    for key in ("format", "virtual-size", "cluster-size"):
        assert ours[key] == theirs[key], key
    assert ours["format-specific"]["data"]["subformat"] == "dynamic"


def test_end_footer_lost_reads_through_the_copy(tmp_path):
    """A dynamic disk whose end footer is damaged opens from the copy at
    offset 0 (qemu does the same); check counts it with the leaks and
    -r leaks mends it."""
    path = tmp_path / "disk.vhd"
    qemu_vhd(path, 8 * MiB)
    expected = qemu_raw(path)
    data = bytearray(path.read_bytes())
    data[-512:] = bytes(512)
    path.write_bytes(data)
    assert read_all(path) == expected
    from conftest import nbdplug
    proc = nbdplug("check", "-f", "vpc", path, check=False)
    assert proc.returncode == 3 and "footer" in proc.stdout
    nbdplug("check", "-f", "vpc", "-r", "leaks", path)
    assert nbdplug("check", "-f", "vpc", path).returncode == 0
    assert qemu_raw(path) == expected


# --- helpers for crafting images (used by the other VHD tests) -----------

def patch_footers(path, **fields):
    """Change footer fields (both copies) and fix their checksums."""
    data = bytearray(path.read_bytes())
    places = [len(data) - 512]
    if data[:8] == vhd.COOKIE:
        places.append(0)
    for at in places:
        footer = vhd.FOOTER.unpack_from(data, at)._replace(**fields)
        data[at:at + 512] = _checksummed(vhd.FOOTER, footer)
    path.write_bytes(data)


def patch_header(path, **fields):
    """Change dynamic header fields and fix its checksum."""
    data = bytearray(path.read_bytes())
    at = struct.unpack_from(">Q", data, 16)[0]
    hdr = vhd.DYNAMIC_HEADER.unpack_from(data, at)._replace(**fields)
    data[at:at + 1024] = _checksummed(vhd.DYNAMIC_HEADER, hdr)
    path.write_bytes(data)
    return at


def header_of(path):
    data = path.read_bytes()
    return vhd.DYNAMIC_HEADER.unpack_from(
        data, struct.unpack_from(">Q", data, 16)[0])


def _checksummed(layout, value):
    raw = bytearray(layout.struct.pack(*value._replace(checksum=0)))
    total = ~sum(raw) & 0xFFFFFFFF
    struct.pack_into(">I", raw, layout.offset("checksum"), total)
    return raw


def set_bat(path, index, entry):
    hdr = header_of(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">I", data, hdr.table_offset + 4 * index, entry)
    path.write_bytes(data)


def test_footer_copy_decides_where_both_are_sound(tmp_path):
    """Footers that disagree (both with good checksums): the copy at
    offset 0 gives the size, as in qemu, which reads it first."""
    path = tmp_path / "disk.vhd"
    qemu_vhd(path, 8 * MiB)
    data = bytearray(path.read_bytes())
    copy = vhd.FOOTER.unpack_from(data, 0)
    data[-512:] = _checksummed(vhd.FOOTER, copy._replace(
        current_size=4 * MiB))
    path.write_bytes(data)
    assert qemu_size(path) == 8 * MiB
    assert read_all(path) == qemu_raw(path)


def test_damaged_copy_reads_through_the_end_footer(tmp_path):
    """A damaged footer copy, the footer itself sound: read, as the
    specification keeps the footer at the end for (qemu refuses)."""
    path = tmp_path / "disk.vhd"
    qemu_vhd(path, 8 * MiB)
    expected = qemu_raw(path)
    data = bytearray(path.read_bytes())
    data[64] ^= 0xFF                        # the copy's checksum
    path.write_bytes(data)
    assert read_all(path) == expected
