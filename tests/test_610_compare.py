"""`nbdplug compare` answers as `qemu-img compare` does: the same lines
and exit status on the same pairs of images, across formats."""

import pytest

from conftest import nbdplug, qemu_io, run, served

MiB = 1 << 20


def make(tmp_path, name, fmt, size, *cmds):
    path = tmp_path / name
    run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)])
    if cmds:
        qemu_io(path, fmt, *cmds)
    return path


def both(*args):
    """(stdout, status) of nbdplug compare and of qemu-img compare."""
    ours = nbdplug("compare", *args, check=False)
    theirs = run(["qemu-img", "compare", *map(str, args)], check=False)
    return (ours.stdout, ours.returncode), (theirs.stdout, theirs.returncode)


BASE = ("write -P 1 0 1M", "write -P 2 7M 64k", "write -z 2M 1M")


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "raw"])
def test_same_guest_bytes_in_another_format(tmp_path, fmt):
    a = make(tmp_path, "a.qcow2", "qcow2", 8 * MiB, *BASE)
    b = tmp_path / f"b.{fmt}"
    run(["qemu-img", "convert", "-O", fmt, a, b])
    ours, theirs = both(a, b)
    assert ours == theirs
    # VHD rounds the size up to its disk geometry: a warning, no more.
    assert ours == ("Warning: Image size mismatch!\n" * (fmt == "vpc") +
                    "Images are identical.\n", 0)


@pytest.mark.parametrize("where", [0, 511, 512, 3 * MiB + 4097,
                                   8 * MiB - 1])
def test_one_byte_apart(tmp_path, where):
    a = make(tmp_path, "a.qcow2", "qcow2", 8 * MiB, *BASE)
    b = tmp_path / "b.vmdk"
    run(["qemu-img", "convert", "-O", "vmdk", a, b])
    qemu_io(b, "vmdk", f"write -P 0x55 {where} 1")
    ours, theirs = both("-f", "qcow2", "-F", "vmdk", a, b)
    assert ours == theirs
    assert ours == (f"Content mismatch at offset {where // 512 * 512}!\n", 1)


def test_sizes_differ(tmp_path):
    short = make(tmp_path, "short.qcow2", "qcow2", 4 * MiB, "write 0 64k")
    longer = tmp_path / "long.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", short, longer])
    run(["qemu-img", "resize", "-q", longer, str(6 * MiB)])
    for args in ((short, longer), (longer, short)):
        ours, theirs = both(*args)
        assert ours == theirs == ("Warning: Image size mismatch!\n"
                                  "Images are identical.\n", 0)
    # Zeros written in the tail still read as zeros; data does not.
    qemu_io(longer, "qcow2", "write -z 5M 64k")
    assert both(short, longer)[0] == both(short, longer)[1]
    qemu_io(longer, "qcow2", "write -P 9 5M 100")
    ours, theirs = both(short, longer)
    assert ours == theirs == ("Warning: Image size mismatch!\n"
                              f"Content mismatch at offset {5 * MiB}!\n", 1)
    ours, theirs = both("-s", short, longer)
    assert ours == theirs == ("Strict mode: Image size mismatch!\n", 1)


def test_strict_compares_allocation(tmp_path):
    a = make(tmp_path, "a.qcow2", "qcow2", 8 * MiB, "write -P 3 1M 64k",
             "write -z 4M 64k")
    b = tmp_path / "b.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", a, b])   # drops the zeros
    assert both(a, b)[0] == ("Images are identical.\n", 0)
    assert nbdplug("compare", "-s", a, a).stdout == "Images are identical.\n"
    ours, theirs = both("-s", a, b)
    assert ours == (f"Strict mode: Offset {4 * MiB} block status "
                    "mismatch!\n", 1)
    assert theirs[1] == 1 and "block status mismatch" in theirs[0]


def test_an_nbd_export_and_a_file(tmp_path):
    a = make(tmp_path, "a.qcow2", "qcow2", 8 * MiB, *BASE)
    b = tmp_path / "b.raw"
    run(["qemu-img", "convert", "-O", "raw", a, b])
    with served(a, "qcow2", readonly=True) as srv:
        proc = nbdplug("compare", "-q", srv.uri, b, check=False)
        assert (proc.stdout, proc.returncode) == ("", 0)
        qemu_io(b, "raw", "write -P 4 6M 1")
        proc = nbdplug("compare", srv.uri, b, check=False)
        assert (proc.stdout, proc.returncode) == (
            f"Content mismatch at offset {6 * MiB}!\n", 1)


def test_bad_input(tmp_path):
    a = make(tmp_path, "a.qcow2", "qcow2", MiB)
    for args, words in (((a, tmp_path / "missing"), "missing"),
                        ((a, tmp_path), "directory"),
                        (("-f", "vmdk", a, a), "a.qcow2"),
                        ((a,), "required")):
        proc = nbdplug("compare", *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "Traceback" not in proc.stderr and words in lines[0], lines
