"""The nbdplug command: output that matches qemu-img, and bad input that
gets one line on stderr and exit 2."""

import json
import os
import subprocess

import nbd
import pytest

from conftest import NBDPLUG, nbdplug, pattern, run, sparse_raw

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    return sparse_raw(tmp_path / "disk.raw", 8 * MiB,
                      [(2 * MiB, pattern(MiB, 1))])


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("nbdplug: ")
    for w in words:
        assert w in lines[0], lines[0]


def test_map_json_matches_qemu_img(image):
    ours = json.loads(nbdplug("map", "-f", "raw", "--output=json",
                              image).stdout)
    theirs = json.loads(run(["qemu-img", "map", "-f", "raw",
                             "--output=json", image]).stdout)
    assert ours == theirs


def test_info_json_matches_qemu_img(image):
    ours = json.loads(nbdplug("info", "--output=json", image).stdout)
    theirs = json.loads(run(["qemu-img", "info", "-f", "raw",
                             "--output=json", image]).stdout)
    for key in ("virtual-size", "format", "actual-size"):
        assert ours[key] == theirs[key], key
    assert os.path.samefile(ours["filename"], theirs["filename"])


def test_info_human(image):
    out = nbdplug("info", image).stdout
    assert "file format: raw" in out
    assert f"({8 * MiB} bytes)" in out


def test_create_raw_sizes(tmp_path):
    path = tmp_path / "new.raw"
    nbdplug("create", "-f", "raw", path, "3M")
    assert os.path.getsize(path) == 3 * MiB
    assert os.stat(path).st_blocks == 0


def test_serve_prints_uri_and_stops(image):
    proc = nbdplug("serve", "-f", "raw", image)
    uri, pidline = proc.stdout.splitlines()
    assert uri.startswith("nbd+unix:///?socket=")
    pid = int(pidline.split()[1])
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.get_size() == 8 * MiB
        assert h.pread(MiB, 2 * MiB) == pattern(MiB, 1)
        h.pwrite(b"\x5a" * 4096, 0)
        h.shutdown()
    finally:
        nbdplug("stop", uri)
    assert not os.path.exists(f"/proc/{pid}") or \
        open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
    with open(image, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096


def test_serve_foreground_tcp_loopback(image):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [*NBDPLUG,
         "serve", "-f", "raw", "--readonly", "--foreground",
         "--listen", f"127.0.0.1:{port}", image],
        stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        uri = proc.stdout.readline().strip()
        assert uri == f"nbd://127.0.0.1:{port}/"
        out = run(["nbdinfo", "--size", uri]).stdout
        assert int(out) == 8 * MiB
    finally:
        proc.terminate()
        proc.wait(10)


def test_listen_beyond_loopback_needs_tls(image):
    proc = nbdplug("serve", "-f", "raw", "--listen", "0.0.0.0:10809",
                   image, check=False)
    assert_one_line_error(proc, "without TLS", "--insecure")


@pytest.mark.parametrize("verb", ["info", "map", "serve"])
def test_missing_file(tmp_path, verb):
    proc = nbdplug(verb, "-f", "raw", tmp_path / "nope.img", check=False)
    assert_one_line_error(proc, "nope.img", "No such file")


@pytest.mark.parametrize("verb", ["info", "map", "serve"])
def test_directory(tmp_path, verb):
    proc = nbdplug(verb, tmp_path, check=False)
    assert_one_line_error(proc, "is a directory")


def test_unknown_format(image):
    proc = nbdplug("info", "-f", "vmdk9", image, check=False)
    assert_one_line_error(proc, "vmdk9")


def test_unreadable_file(image):
    os.chmod(image, 0)
    os.chmod(os.path.dirname(image), 0o755)
    # Root reads anything: drop to nobody to be refused for real.
    proc = run(["setpriv", "--reuid=nobody", "--regid=nogroup",
                "--clear-groups", *_nbdplug_argv("info", "-f", "raw",
                                                 image)],
               check=False, env={**os.environ, "PYTHONDONTWRITEBYTECODE":
                                 "1"})
    assert_one_line_error(proc, "Permission denied")


def _nbdplug_argv(*args):
    from conftest import NBDPLUG, REPO
    return NBDPLUG[:1] + ["-c", "import sys; sys.path.insert(0, %r); "
                          "from nbdplug.cli import main; "
                          "sys.exit(main())" % REPO, *args]


@pytest.mark.parametrize("size", ["abc", "12Q", "-5", "1.5G", ""])
def test_size_not_a_number(tmp_path, size):
    path = tmp_path / "new.raw"
    proc = nbdplug("create", "-f", "raw", path, size, check=False)
    assert_one_line_error(proc, "size")
    assert not path.exists()


def test_unknown_verb_and_option(image):
    assert_one_line_error(nbdplug("frobnicate", check=False))
    assert_one_line_error(nbdplug("info", "--bogus", image, check=False),
                          "--bogus")


def test_create_refuses_existing(image):
    with open(image, "rb") as f:
        before = f.read()
    proc = nbdplug("create", "-f", "raw", image, "1M", check=False)
    assert_one_line_error(proc, "already exists")
    with open(image, "rb") as f:
        assert f.read() == before
