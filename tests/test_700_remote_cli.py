"""`nbdplug serve` settings: what it refuses (one line, exit 2, before
nbdkit runs), the exports config file, and a clean stop with a client
connected."""

import os
import signal
import subprocess
import tempfile

import nbd
import pytest

from conftest import NBDPLUG, REPO, nbdplug
from nbdplug import FORMATS
from nbdplug.serve.exports import load, parse_export
from conftest import pattern
from test_300_cli import assert_one_line_error, image  # noqa: F401
from test_700_remote_serve import make_pki

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), ["127.0.0.1"])


def serve(*args):
    return nbdplug("serve", "--listen", "10.1.2.3:10809", *args, check=False)


def copy_dir(src, dst, **replace):
    os.makedirs(dst)
    for name in os.listdir(src):
        data = replace.get(name, (src / name).read_bytes())
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(dst, name), os.stat(src / name).st_mode)
    return dst


def test_tls_files_refused_in_one_line(image, pki, tmp_path):
    missing = tmp_path / "nope.psk"
    assert_one_line_error(serve("--tls-psk", missing, image),
                          "nope.psk", "No such file")
    loose = tmp_path / "loose.psk"
    loose.write_bytes(pki.psk.read_bytes())
    os.chmod(loose, 0o644)
    assert_one_line_error(serve("--tls-psk", loose, image),
                          "loose.psk", "0644", "chmod 600")
    garbage = tmp_path / "garbage.psk"
    garbage.write_text("alice:not-hex\n")
    os.chmod(garbage, 0o600)
    assert_one_line_error(serve("--tls-psk", garbage, image),
                          "line 1", "IDENTITY:HEXKEY")

    assert_one_line_error(serve("--tls-certs", tmp_path / "nodir", image),
                          "nodir", "No such file")
    nokey = copy_dir(pki.server, tmp_path / "nokey")
    os.unlink(os.path.join(nokey, "server-key.pem"))
    assert_one_line_error(serve("--tls-certs", nokey, image),
                          "server-key.pem is missing")
    bad = copy_dir(pki.server, tmp_path / "bad",
                   **{"server-cert.pem": b"not a certificate\n"})
    assert_one_line_error(serve("--tls-certs", bad, image),
                          "server-cert.pem", "not a PEM certificate")
    badca = copy_dir(pki.server, tmp_path / "badca",
                     **{"ca-cert.pem": b"junk\n"})
    assert_one_line_error(serve("--tls-certs", badca, image), "ca-cert.pem")
    mismatched = copy_dir(pki.server, tmp_path / "mismatched", **{
        "server-key.pem": (pki.client / "client-key.pem").read_bytes()})
    assert_one_line_error(serve("--tls-certs", mismatched, image),
                          "its key")
    open_key = copy_dir(pki.server, tmp_path / "openkey")
    os.chmod(os.path.join(open_key, "server-key.pem"), 0o640)
    assert_one_line_error(serve("--tls-certs", open_key, image),
                          "server-key.pem", "0640")

    assert_one_line_error(serve("--tls-psk", pki.psk, "--tls-certs",
                                pki.server, image), "not both")
    assert_one_line_error(serve("--tls-verify-peer", "--tls-psk", pki.psk,
                                image), "--tls-certs")


@pytest.mark.parametrize("args, words", [
    (["--allow", "10.0.0.300"], ["10.0.0.300", "not an IP"]),
    (["--export", "a"], ["NAME=IMAGE"]),
    (["--export", "a=x:raw", "--export", "a=y:raw"], ["'a' given twice"]),
    (["--readonly", "--writable"], ["not both"]),
    (["--limit", "-1"], ["limit of -1"]),
])
def test_serve_arguments_refused(image, pki, args, words):
    args = [a.replace("x:", image + ":").replace("y:", image + ":")
            for a in args]
    assert_one_line_error(serve("--tls-psk", pki.psk, *args, image), *words)


def test_allow_needs_tcp(image):
    proc = nbdplug("serve", "--socket", "/tmp/x.sock", "--allow",
                   "10.0.0.1", image, check=False)
    assert_one_line_error(proc, "--allow", "--listen")


def test_clear_text_needs_insecure(image):
    assert_one_line_error(serve(image), "without TLS", "--insecure")


@pytest.mark.parametrize("text, words", [
    ("[server]\nlisten = x\n[export a]\nformat = raw\n",
     ["[export a]", "image = PATH is required"]),
    ("[server]\nlistne = 1.2.3.4:5\n", ["[server]", "unknown key 'listne'"]),
    ("[exports a]\nimage = x\n", ["[exports a]", "[export NAME]"]),
    ("[export a]\nimage = x\nformat = qcow9\n", ["qcow9"]),
    ("[export a]\nimage = x\nwritable = perhaps\n", ["perhaps"]),
    ("[export a]\nimage = x\nlimit = -1\n", ["limit", "number"]),
    ("[export a]\nimage = x\n[export a]\nimage = y\n",
     ["line 3", "already exists"]),
    ("[export a]\nimage = x\n[export  a]\nimage = y\n", ["'a' given twice"]),
    ("no section\n", ["section"]),
    ("[server]\nlisten = \xff\n", ["not a text file"]),
])
def test_config_file_refused(tmp_path, text, words):
    conf = tmp_path / "bad.conf"
    conf.write_bytes(text.encode("latin-1"))
    proc = nbdplug("serve", "--config", conf, check=False)
    assert_one_line_error(proc, "bad.conf", *words)


def test_config_file_and_export_arguments(tmp_path):
    conf = tmp_path / "etc" / "s.conf"
    conf.parent.mkdir()
    conf.write_text("""
[server]
listen = [fd00::1]:10809
tls-certs = pki
tls-verify-peer = yes
allow = 10.0.0.0/8 , fd00::/16

[export guest:1]
image = ../images/g1.qcow2
writable = on
limit = 2
description = first guest
""")
    cfg = load(str(conf), FORMATS)
    assert cfg.listen == "[fd00::1]:10809"
    assert cfg.tls_certs == str(tmp_path / "etc" / "pki")
    assert cfg.tls_verify_peer and cfg.allow == ["10.0.0.0/8", "fd00::/16"]
    [e] = cfg.exports
    assert (e.name, e.writable, e.limit, e.description) == \
        ("guest:1", True, 2, "first guest")
    assert os.path.normpath(e.image) == str(tmp_path / "images" /
                                            "g1.qcow2")
    # FMT only when it names a format: image paths may hold colons.
    assert parse_export("a=/srv/x:y.img", FORMATS).image == "/srv/x:y.img"
    e = parse_export("b=/srv/x.img:qcow2", FORMATS, "raw")
    assert (e.image, e.format) == ("/srv/x.img", "qcow2")
    assert parse_export("c=/srv/x.img", FORMATS, "raw").format == "raw"


def test_unknown_export_from_the_client_side(image):
    proc = nbdplug("serve", "--export", f"a={image}:raw")
    uri = proc.stdout.splitlines()[0]
    sock = uri.split("socket=")[1]
    try:
        assert uri.startswith("nbd+unix:///a?socket=")
        proc = nbdplug("info", uri.replace("///a?", "///b?"), check=False)
        assert_one_line_error(proc, "no export named 'b'")
        # With one export, the empty name means it.
        h = nbd.NBD()
        h.set_full_info(True)
        h.connect_uri(uri.replace("///a?", "///?"))
        assert h.get_canonical_export_name() == "a"
        assert h.pread(MiB, 2 * MiB) == pattern(MiB, 1)
        h.shutdown()
    finally:
        nbdplug("stop", sock)


def test_foreground_sigterm_with_idle_client(image):
    """SIGTERM to `serve --foreground` (as systemd or a terminal sends
    it) ends the server even with a client connected, after flushing."""
    sockdir = tempfile.mkdtemp(prefix="nbdplug-test.")
    sock = os.path.join(sockdir, "nbd.sock")
    proc = subprocess.Popen(NBDPLUG + ["serve", "-f", "raw", "--foreground",
                                       "--socket", sock, image],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        uri = proc.stdout.readline().strip()
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"\xee" * 4096, 8192)          # acknowledged, unflushed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
    finally:
        proc.kill()
        proc.wait()
        os.rmdir(sockdir)
    with open(image, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"\xee" * 4096


def test_second_server_on_a_port_in_use(image, pki):
    """On loopback (the netns suite does it across hosts, too)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = nbdplug("serve", "--listen", f"127.0.0.1:{port}", image,
                       check=False)
    assert_one_line_error(proc, f"127.0.0.1:{port}", "Address already in use")
