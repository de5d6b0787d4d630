"""`nbdplug create/info/check` on VMDK images: options as qemu-img takes
them, the descriptor we write, what check finds; descriptor parsing."""

import json
import os
import re
import struct

import pytest

from conftest import nbdplug, run
from nbdplug import CorruptImage, UnsupportedFeature, open_image
from nbdplug.formats.vmdk import descriptor
from test_300_cli import assert_one_line_error
from test_400_vmdk_read import SUBFORMATS, qemu_io, qemu_vmdk

MiB = 1 << 20


def ddb(text):
    return dict(re.findall(r'^(ddb\.[\w.]+) = "(.*)"$', text, re.M))


def descriptor_text(image):
    with open(image, "rb") as f:
        data = f.read(64 * 1024)
    if data[:4] == b"KDMV":
        data = data[512:512 + 20 * 512]
    return data.split(b"\0")[0].decode()


@pytest.mark.parametrize("adapter", ["ide", "lsilogic"])
def test_create_options_match_qemu(tmp_path, adapter):
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "qemu.vmdk"
    out = nbdplug("create", "-f", "vmdk", "-o",
                  f"adapter_type={adapter},hwversion=6", ours, "10G").stdout
    assert out.startswith(f"Formatting '{ours}', fmt=vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
         f"adapter_type={adapter},hwversion=6", str(theirs), "10G"])
    a, b = ddb(descriptor_text(ours)), ddb(descriptor_text(theirs))
    b.pop("ddb.toolsVersion")
    if adapter == "ide":       # VMware stops at the ATA limit; qemu not
        assert a.pop("ddb.geometry.cylinders") == "16383"
        b.pop("ddb.geometry.cylinders")
    assert a == b
    assert a["ddb.virtualHWVersion"] == "6"
    info = json.loads(nbdplug("info", "--output=json", ours).stdout)
    q = json.loads(run(["qemu-img", "info", "--output=json",
                        str(theirs)]).stdout)
    assert info["virtual-size"] == q["virtual-size"] == 10 << 30
    assert info["cluster-size"] == q["cluster-size"]
    assert info["format-specific"]["data"]["adapter-type"] == adapter
    # The same layout as qemu's: header fields agree but for the CID.
    assert open(ours, "rb").read(512) == open(theirs, "rb").read(512)


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_create_every_subformat_as_qemu_sees_it(tmp_path, subformat):
    image = tmp_path / "d.vmdk"
    nbdplug("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}",
            image, "3G")
    q = json.loads(run(["qemu-img", "info", "--output=json",
                        str(image)]).stdout)
    assert q["virtual-size"] == 3 << 30
    data = q["format-specific"]["data"]
    assert data["create-type"] == subformat
    ours = json.loads(nbdplug("info", "--output=json", image).stdout)
    mine = ours["format-specific"]["data"]
    assert mine["create-type"] == subformat and mine["cid"] == data["cid"]
    assert [os.path.basename(e["filename"]) for e in mine["extents"]] == \
        [os.path.basename(e["filename"]) for e in data["extents"]]
    assert [e["virtual-size"] for e in mine["extents"]] == \
        [e["virtual-size"] for e in data["extents"]]
    run(["qemu-img", "check", str(image)])
    assert nbdplug("check", image).returncode == 0
    human = nbdplug("info", image).stdout
    assert f"create-type: {subformat}" in human and "extents:" in human


@pytest.mark.parametrize("options,words", [
    ("subformat=vmfs", ["subformat=vmfs", "expected one of"]),
    ("adapter_type=floppy", ["adapter_type=floppy"]),
    ("hwversion=abc", ["hwversion=abc"]),
    ("compat6=on", ["vmdk does not take -o compat6"]),
    ("zeroed_grain=on,subformat=monolithicFlat", ["zeroed_grain needs"]),
])
def test_create_refuses_bad_options(tmp_path, options, words):
    image = tmp_path / "d.vmdk"
    proc = nbdplug("create", "-f", "vmdk", "-o", options, image, "1G",
                   check=False)
    assert_one_line_error(proc, *words)
    assert not os.listdir(tmp_path)


def test_create_flat_delta_refused(tmp_path):
    base = qemu_vmdk(tmp_path, "monolithicSparse", "empty", name="b.vmdk")
    proc = nbdplug("create", "-f", "vmdk", "-o", "subformat=monolithicFlat",
                   "-b", base.name, "-F", "vmdk", tmp_path / "c.vmdk",
                   check=False)
    assert_one_line_error(proc, "cannot have a parent")
    assert sorted(os.listdir(tmp_path)) == ["b.vmdk"]


def test_info_shows_subformat_extents_and_chain(tmp_path):
    base = qemu_vmdk(tmp_path, "twoGbMaxExtentFlat", "empty", name="b.vmdk")
    child = tmp_path / "c.vmdk"
    nbdplug("create", "-q", "-f", "vmdk", "-b", "b.vmdk", child)
    info = json.loads(nbdplug("info", "--output=json", child).stdout)
    data = info["format-specific"]["data"]
    assert data["create-type"] == "monolithicSparse"
    assert info["backing-filename"] == "b.vmdk"
    assert info["full-backing-filename"] == str(base)
    parent = info["backing-image"]["format-specific"]["data"]
    assert parent["create-type"] == "twoGbMaxExtentFlat"
    assert data["parent-cid"] == parent["cid"]
    assert parent["extents"][0]["format"] == "FLAT"
    human = nbdplug("info", child).stdout
    assert "backing file: b.vmdk" in human and "backing image:" in human


def test_probe_finds_both_kinds(tmp_path):
    for sub in ("monolithicSparse", "monolithicFlat"):
        image = qemu_vmdk(tmp_path, sub, "empty", name=f"{sub}.vmdk")
        info = json.loads(nbdplug("info", "--output=json", image).stdout)
        assert info["format"] == "vmdk"


# --- check -------------------------------------------------------------------

def sparse_with_data(tmp_path):
    image = qemu_vmdk(tmp_path, "monolithicSparse", "partial")
    with open(image, "rb") as f:
        hdr = struct.unpack_from("<4sIIQQQQIQQQ", f.read(512))
        gd_offset, rgd_offset = hdr[9], hdr[8]
        f.seek(gd_offset * 512)
        gt = int.from_bytes(f.read(4), "little")
        f.seek(gt * 512)
        table = list(struct.unpack("<512I", f.read(2048)))
    return image, gt, table, rgd_offset


def test_check_clean_images_of_qemu(tmp_path):
    for sub in SUBFORMATS:
        image = qemu_vmdk(tmp_path, sub, "partial", name=f"{sub}.vmdk")
        proc = nbdplug("check", "--output=json", image)
        report = json.loads(proc.stdout)
        assert "corruptions" not in report and "leaks" not in report, sub
        if sub != "monolithicFlat" and not sub.endswith("Flat"):
            assert report["allocated-clusters"] > 0


def test_check_finds_two_entries_sharing_a_grain(tmp_path):
    image, gt, table, _ = sparse_with_data(tmp_path)
    used = [i for i, e in enumerate(table) if e]
    with open(image, "r+b") as f:
        f.seek(gt * 512 + 4 * 200)          # an unallocated grain
        f.write(table[used[0]].to_bytes(4, "little"))
    proc = nbdplug("check", image, check=False)
    assert proc.returncode == 2
    assert "points at a grain another entry uses" in proc.stdout
    # qemu-img check does not look for this; reading still works.
    run(["qemu-img", "check", str(image)])


def test_check_finds_leaked_grains(tmp_path):
    image, _, _, _ = sparse_with_data(tmp_path)
    with open(image, "ab") as f:
        f.write(b"\1" * 3 * 65536)
    proc = nbdplug("check", "--output=json", image, check=False)
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["leaks"] == 3


def test_check_finds_redundant_tables_apart_on_a_clean_image(tmp_path):
    image, _, _, rgd = sparse_with_data(tmp_path)
    with open(image, "r+b") as f:
        f.seek(rgd * 512)
        rgt = int.from_bytes(f.read(4), "little")
        f.seek(rgt * 512 + 4 * 300)
        f.write((777).to_bytes(4, "little"))
    proc = nbdplug("check", image, check=False)
    assert proc.returncode == 2
    assert "rgdOffset: 1 redundant grain table entries differ" in proc.stdout


def test_check_reports_bad_entries_and_goes_on(tmp_path):
    image, gt, table, _ = sparse_with_data(tmp_path)
    with open(image, "r+b") as f:
        for i in (0, 1):
            f.seek(gt * 512 + 4 * i)
            f.write((0x7FFFFF00 + i).to_bytes(4, "little"))
    proc = nbdplug("check", image, check=False)
    assert proc.returncode == 2
    assert proc.stdout.count("points past the end of the file") == 2
    assert "2 redundant grain table entries differ" in proc.stdout
    assert "3 errors were found" in proc.stdout
    qemu = run(["qemu-img", "check", str(image)], check=False)
    assert "points after EOF" in qemu.stderr    # qemu agrees


def test_check_repair_is_refused(tmp_path):
    image, _, _, _ = sparse_with_data(tmp_path)
    proc = nbdplug("check", "-r", "all", image, check=False)
    assert proc.returncode == 63
    assert "repairing VMDK images is not supported" in proc.stderr


# --- descriptors -------------------------------------------------------------

def test_descriptor_crlf_quotes_and_cid_span():
    text = (b'\xef\xbb\xbfversion=1\r\nencoding="UTF-8"\r\n'
            b'  CID = "00ab12" \r\nparentCID=ffffffff\r\n'
            b'createType="twoGbMaxExtentFlat"\r\n'
            b'RW 100 FLAT "my disk-f001.vmdk" 0\r\n'
            b'RDONLY 50 VMFS "x.vmdk" 7\r\nNOACCESS 8 ZERO\r\n'
            b'ddb.adapterType = "buslogic"\r\n\0junk after NUL')
    d = descriptor.parse(text, "d.vmdk")
    assert d.cid == 0xab12 and d.parent_cid == descriptor.NO_PARENT
    start, end = d.cid_span
    assert text[start:end] == b"00ab12"
    assert d.create_type == "twoGbMaxExtentFlat" and not d.has_parent
    assert [tuple(e) for e in d.extents] == [
        ("RW", 100, "FLAT", "my disk-f001.vmdk", 0),
        ("RDONLY", 50, "VMFS", "x.vmdk", 7),
        ("NOACCESS", 8, "ZERO", None, 0)]
    assert d.keys["ddb.adapterType"] == "buslogic"


@pytest.mark.parametrize("text,error,match", [
    (b'version=1\nCID=1\nCID=2\ncreateType="monolithicFlat"\n',
     CorruptImage, "CID is given twice"),
    (b'version=1\nCID=123456789\ncreateType="monolithicFlat"\n',
     CorruptImage, "CID: is not a 32-bit"),
    (b'version=9\ncreateType="monolithicFlat"\n',
     UnsupportedFeature, "version '9'"),
    (b'version=1\ncreateType="vmfsSparse"\n', UnsupportedFeature,
     "'vmfsSparse' disks are not supported"),
    (b'version=1\n', CorruptImage, "no createType"),
    (b'version=1\ncreateType="monolithicFlat"\nparentFileNameHint=""\n',
     CorruptImage, "parentFileNameHint: is empty"),
])
def test_descriptor_refusals(text, error, match):
    with pytest.raises(error, match=match):
        descriptor.parse(text, "d.vmdk")


def test_render_round_trips():
    lines = [descriptor.ExtentLine("RW", 8, "FLAT", "a b.vmdk", 0),
             descriptor.ExtentLine("RW", 8, "ZERO", None, 0)]
    text = descriptor.render("monolithicFlat", 0xF00D, lines,
                             {"ddb.adapterType": "ide"}, 0x1234, "p.vmdk")
    d = descriptor.parse(text, "d.vmdk")
    assert (d.cid, d.parent_cid, d.parent_hint) == (0xF00D, 0x1234,
                                                    "p.vmdk")
    assert d.extents == lines


def test_split_extent_opened_directly_is_refused(tmp_path):
    """An extent of a split image has a blank descriptor area: nothing
    says what it is part of, and qemu and libvmdk refuse it."""
    image = qemu_vmdk(tmp_path, "twoGbMaxExtentSparse", "empty")
    qemu_io(image, "write -P 9 0 64k")
    extent = tmp_path / "disk-s001.vmdk"
    assert run(["qemu-img", "info", "-f", "vmdk", str(extent)],
               check=False).returncode != 0
    for readonly in (True, False):
        with pytest.raises(CorruptImage, match="blank"):
            open_image(str(extent), "vmdk", readonly=readonly)


def test_convert_compressed_as_qemu_img_does(tmp_path):
    """-c deflates a streamOptimized target's grains; other subformats
    store them plainly, as qemu-img convert -c does."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(b"%08d" % i for i in range(MiB)))    # 8 MiB
    for subformat in ("streamOptimized", "monolithicSparse"):
        out = tmp_path / f"{subformat}.vmdk"
        nbdplug("convert", "-c", "-O", "vmdk", "-o",
                f"subformat={subformat}", src, out)
        run(["qemu-img", "compare", "-f", "raw", str(src), str(out)])
    assert os.path.getsize(tmp_path / "streamOptimized.vmdk") * 2 < \
        os.path.getsize(tmp_path / "monolithicSparse.vmdk")
