"""Every format through the verbs: convert to and from every writable
format, compare, info's JSON, check's exit codes, and create with `-o`
spelled as qemu-img takes it (size suffixes, on/off)."""

import json
import os

import pytest

from conformance.formats import ROWS, WRITABLE, MiB, ram_name, remove_ram
from conftest import (nbdplug, qemu_img_check_clean, qemu_img_compare,
                      qemu_img_info, run)
from nbdplug.options import parse_size

TARGETS = [r.fmt for r in WRITABLE]


def _target(tmp_path, fmt):
    if fmt == "ram":
        return f"ram:{ram_name(str(tmp_path))}"
    return str(tmp_path / f"out.{fmt}")


@pytest.mark.parametrize("out_fmt", TARGETS)
def test_convert_to_every_writable_format(fixture, tmp_path, out_fmt):
    out = _target(tmp_path, out_fmt)
    try:
        nbdplug("convert", "-f", fixture.row.fmt, "-O", out_fmt,
                fixture.image, out)
        # Read back by qemu where it can, and by nbdplug compare always.
        if out_fmt != "ram":
            qemu_img_compare(fixture.reference, out, "raw", out_fmt)
        proc = nbdplug("compare", "-f", "raw", "-F", out_fmt,
                       fixture.reference, out, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if out_fmt in ("qcow2", "vmdk"):
            qemu_img_check_clean(out)
    finally:
        remove_ram(out)


@pytest.mark.parametrize("row", WRITABLE, ids=str)
def test_convert_from_raw_into_the_format(fixture, tmp_path):
    """The way in: a raw disk converted into this format reads back the
    same, and converted out again gives the raw bytes."""
    fmt = fixture.row.fmt
    into = _target(tmp_path, fmt)
    back = tmp_path / "back.raw"
    try:
        nbdplug("convert", "-f", "raw", "-O", fmt, fixture.reference, into)
        nbdplug("convert", "-f", fmt, "-O", "raw", into, back)
        assert back.read_bytes() == fixture.reference_bytes()
    finally:
        remove_ram(into)


def test_compare_finds_equal_and_different(fixture, tmp_path):
    fmt = fixture.row.fmt
    proc = nbdplug("compare", "-f", fmt, "-F", "raw", fixture.image,
                   fixture.reference)
    assert proc.stdout.strip() == "Images are identical."
    other = tmp_path / "other.raw"
    data = bytearray(fixture.reference_bytes())
    data[3 * MiB + 512] ^= 0xFF
    other.write_bytes(data)
    proc = nbdplug("compare", "-f", fmt, "-F", "raw", fixture.image,
                   other, check=False)
    assert proc.returncode == 1
    assert proc.stdout.strip() == "Content mismatch at offset " \
        f"{3 * MiB + 512}!"


# Keys whose values must agree with qemu-img info's.
INFO_KEYS = ("format", "virtual-size", "cluster-size", "backing-filename",
             "backing-filename-format", "dirty-flag")


def test_info_json_says_what_qemu_img_says(fixture):
    ours = json.loads(nbdplug("info", "--output=json", "-f",
                              fixture.row.fmt, fixture.image).stdout)
    assert {"filename", "format", "virtual-size", "actual-size"} <= \
        set(ours)
    if not fixture.row.qemu_reads:
        assert ours["format"] == fixture.row.fmt
        return
    theirs = qemu_img_info(fixture.image, "-f", fixture.row.fmt)
    for key in INFO_KEYS:
        assert ours.get(key) == theirs.get(key), key
    assert ("backing-image" in ours) == \
        ("backing-filename" in theirs)


def test_check_exit_codes_as_qemu_img(fixture):
    proc = nbdplug("check", "-f", fixture.row.fmt, fixture.image,
                   check=False)
    if fixture.row.checks:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "No errors were found on the image." in proc.stdout
    else:
        assert proc.returncode == 63, proc.stderr
        assert "does not support checks" in proc.stderr
    if fixture.row.qemu_reads and \
            fixture.row.qemu_checks == fixture.row.checks:
        theirs = run(["qemu-img", "check", "-f", fixture.row.fmt,
                      fixture.image], check=False)
        assert proc.returncode == theirs.returncode


@pytest.mark.parametrize("row", WRITABLE, ids=str)
def test_create_takes_qemu_img_spelling(row, tmp_path):
    ours = _target(tmp_path, row.fmt)
    options = ["-o", row.create_options] if row.create_options else []
    try:
        nbdplug("create", "-q", "-f", row.fmt, *options, ours, "5M")
        info = json.loads(nbdplug("info", "--output=json", ours).stdout)
        assert info["format"] == row.fmt
        assert info["virtual-size"] >= 5 * MiB
        if row.qemu_reads:
            theirs = str(tmp_path / f"qemu.{row.fmt}")
            run(["qemu-img", "create", "-q", "-f", row.fmt, *options,
                 theirs, "5M"])
            a, b = qemu_img_info(ours), qemu_img_info(theirs)
            for key in ("virtual-size", "cluster-size"):
                assert a.get(key) == b.get(key), key
        if row.qemu_checks:
            qemu_img_check_clean(ours)
    finally:
        remove_ram(ours)


@pytest.mark.parametrize("options, problem", [
    ("cluster_size=64q", "is not a number"),
    ("extended_l2=maybe", "expected on or off"),
    ("no_such_option=1", "does not take -o no_such_option"),
])
def test_create_refuses_bad_options_in_one_line(tmp_path, options, problem):
    proc = nbdplug("create", "-f", "qcow2", "-o", options,
                   tmp_path / "x.qcow2", "1M", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and problem in proc.stderr, \
        proc.stderr
    assert not os.path.exists(tmp_path / "x.qcow2")


@pytest.mark.parametrize("size", ["64k", "2M", "128k", "65536"])
def test_qcow2_cluster_size_takes_suffixes(tmp_path, size):
    image = tmp_path / "x.qcow2"
    nbdplug("create", "-q", "-f", "qcow2", "-o", f"cluster_size={size}",
            image, "4M")
    assert qemu_img_info(image)["cluster-size"] == parse_size(size)


def test_every_format_has_a_row():
    from nbdplug.formats import FORMATS
    assert sorted(FORMATS) == sorted({r.fmt for r in ROWS})
