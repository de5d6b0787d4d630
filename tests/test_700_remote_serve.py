"""`nbdplug serve` reached from another host: two network namespaces
joined by a veth pair, the server on one, real clients (qemu-img,
qemu-io, nbdinfo, nbdcopy, libnbd, nbdplug itself) on the other, over
TLS with pre-shared keys and with X.509 certificates."""

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import NBDPLUG, REPO, qemu_img_compare, run
from netns import TwoHosts
from nbdplug.serve import nbdkit as server
from conftest import pattern

MiB = 1 << 20
PORTS = itertools.count(10809)


# --- fixtures: the two hosts, keys and certificates, images -------------

@pytest.fixture(scope="module")
def hosts():
    with TwoHosts() as two:
        yield two


def make_ca(d, name):
    d.mkdir(parents=True)
    run(["certtool", "--generate-privkey", "--key-type=ecdsa",
         "--outfile", d / "ca-key.pem"])
    (d / "ca.info").write_text(f"cn = {name}\nca\ncert_signing_key\n"
                               "expiration_days = 2\n")
    run(["certtool", "--generate-self-signed", "--load-privkey",
         d / "ca-key.pem", "--template", d / "ca.info",
         "--outfile", d / "ca-cert.pem"])
    return d


def issue(ca, d, role, template):
    """A key and certificate from `ca` as nbdkit (role=server) or libnbd
    and qemu (role=client) look for them in a directory."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    run(["certtool", "--generate-privkey", "--key-type=ecdsa",
         "--outfile", d / f"{role}-key.pem"])
    (d / f"{role}.info").write_text(template + "expiration_days = 2\n")
    run(["certtool", "--generate-certificate",
         "--load-ca-certificate", ca / "ca-cert.pem",
         "--load-ca-privkey", ca / "ca-key.pem",
         "--load-privkey", d / f"{role}-key.pem",
         "--template", d / f"{role}.info",
         "--outfile", d / f"{role}-cert.pem"])
    return d


def make_pki(base, server_ips):
    """Directories: server (nbdkit), client, rogue (a client certificate
    from another CA); PSK files: psk (alice), psk_bob, psk_wrong (alice
    with another key), and qemu's view of alice's (a dir with keys.psk)."""
    ca = make_ca(base / "ca", "nbdplug test CA")
    rogue_ca = make_ca(base / "rogue-ca", "somebody else's CA")
    ips = "".join(f"ip_address = {ip}\n" for ip in server_ips)
    pki = type("PKI", (), {})()
    pki.server = issue(ca, base / "server", "server",
                       f"cn = nbd-server\n{ips}tls_www_server\n"
                       "encryption_key\nsigning_key\n")
    client = ("cn = client\ntls_www_client\nencryption_key\n"
              "signing_key\n")
    pki.client = issue(ca, base / "client", "client", client)
    pki.rogue = issue(rogue_ca, base / "rogue", "client", client)
    # The rogue trusts our CA (to accept the server), not its signer.
    (pki.rogue / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    qemu = base / "qemu-psk"
    qemu.mkdir()
    pki.psk = qemu / "keys.psk"
    run(["psktool", "-u", "alice", "-p", pki.psk])
    pki.qemu_psk_dir = qemu
    pki.psk_bob = base / "bob.psk"
    run(["psktool", "-u", "bob", "-p", pki.psk_bob])
    pki.psk_wrong = base / "wrong.psk"
    run(["psktool", "-u", "alice", "-p", pki.psk_wrong])
    return pki


@pytest.fixture(scope="module")
def pki(hosts, tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"),
                    [hosts.server.ip, hosts.server.ip6])


def guest_raw(path, size=16 * MiB):
    """Data that says where it came from, with holes between."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate((0, 3 * MiB + 512, 11 * MiB)):
            f.seek(off)
            f.write(pattern(MiB + 4096, i))
    return str(path)


@pytest.fixture
def images(tmp_path):
    raw = guest_raw(tmp_path / "guest.raw")
    qcow2 = str(tmp_path / "guest.qcow2")
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
    return raw, qcow2


# --- helpers -----------------------------------------------------------

@contextlib.contextmanager
def remote_server(hosts, tmp_path, *args, ip6=False):
    """`nbdplug serve --listen` on the server host; yields (port, the
    URIs it printed); stops it with SIGTERM, as nbdplug stop does."""
    port = next(PORTS)
    addr = f"[{hosts.server.ip6}]" if ip6 else hosts.server.ip
    pidfile = tmp_path / f"server-{port}.pid"
    proc = hosts.server.run(
        NBDPLUG + ["serve", "--listen", f"{addr}:{port}", "--pidfile",
                   pidfile, *args], cwd=REPO)
    uris = proc.stdout.splitlines()[:-1]
    try:
        yield port, uris
    finally:
        if pidfile.exists():        # not when a test stopped it already
            server.stop(str(pidfile))


def psk_uri(host, port, name, pki, keys=None, user="alice"):
    return (f"nbds://{user}@{host}:{port}/{name}"
            f"?tls-psk-file={keys or pki.psk}")


def x509_uri(host, port, name, certs):
    return f"nbds://{host}:{port}/{name}?tls-certificates={certs}"


def qemu_tls(pki, kind):
    if kind == "psk":
        return ["--object", f"tls-creds-psk,id=tls0,dir={pki.qemu_psk_dir},"
                "username=alice,endpoint=client"]
    return ["--object", f"tls-creds-x509,id=tls0,dir={pki.client},"
            "endpoint=client"]


def qemu_nbd_opts(host, port, name, tls=True):
    return (f"driver=nbd,host={host},port={port},export={name}"
            + (",tls-creds=tls0" if tls else ""))


# Scripts run on the client host with libnbd; connect() takes a URI that
# names a local key file, which libnbd allows only when asked to.
CLIENT_PRELUDE = """
import sys, nbd
argv = sys.argv[1:]
def connect(uri, strict=True):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h
"""


def client_python(hosts, code, *args, check=True):
    return hosts.client.run([sys.executable, "-c", CLIENT_PRELUDE + code,
                             *args], check=check)


def client_popen(hosts, code, *args, **kw):
    return hosts.client.popen([sys.executable, "-c", CLIENT_PRELUDE + code,
                               *args], text=True, **kw)


def refused(proc):
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


# --- TLS with pre-shared keys -----------------------------------------

def test_psk_qemu_img_nbdinfo_nbdcopy_nbdplug(hosts, pki, images, tmp_path):
    raw, qcow2 = images
    ip = hosts.server.ip
    with remote_server(hosts, tmp_path, "--tls-psk", pki.psk,
                       "--export", f"raw={raw}:raw",
                       "--export", f"qcow2={qcow2}") as (port, uris):
        assert uris == [f"nbds://{ip}:{port}/raw", f"nbds://{ip}:{port}/qcow2"]
        listing = json.loads(hosts.client.run(
            ["nbdinfo", "--list", "--json",
             psk_uri(ip, port, "", pki)]).stdout)
        exports = {e["export-name"]: e for e in listing["exports"]}
        assert set(exports) == {"raw", "qcow2"}
        assert all(e["is_read_only"] for e in exports.values())
        assert exports["qcow2"]["export-size"] == 16 * MiB

        # qemu-img convert and compare, over TLS, from the other host.
        out = tmp_path / "out.raw"
        hosts.client.run(["qemu-img", "convert", *qemu_tls(pki, "psk"),
                          "--image-opts", qemu_nbd_opts(ip, port, "qcow2"),
                          "-O", "raw", out])
        qemu_img_compare(str(out), raw, "raw", "raw")
        hosts.client.run(["qemu-img", "compare", *qemu_tls(pki, "psk"),
                          "--image-opts", qemu_nbd_opts(ip, port, "raw"),
                          f"driver=raw,file.filename={raw}"])

        # nbdcopy.
        copy = tmp_path / "copy.raw"
        hosts.client.run(["nbdcopy", psk_uri(ip, port, "qcow2", pki), copy])
        assert copy.read_bytes() == open(raw, "rb").read()

        # nbdplug: info, map (as qemu-img maps the same export), convert.
        uri = psk_uri(ip, port, "qcow2", pki)
        info = json.loads(hosts.client.run(
            NBDPLUG + ["info", "--output=json", uri], cwd=REPO).stdout)
        assert info["virtual-size"] == 16 * MiB
        assert info["format-specific"]["data"] == {
            "protocol": "nbd", "export": "qcow2", "tls": True}
        ours = json.loads(hosts.client.run(
            NBDPLUG + ["map", "--output=json", uri], cwd=REPO).stdout)
        theirs = json.loads(hosts.client.run(
            ["qemu-img", "map", "--output=json", *qemu_tls(pki, "psk"),
             "--image-opts", qemu_nbd_opts(ip, port, "qcow2")]).stdout)
        fields = ("start", "length", "zero", "data")
        assert [[e[k] for k in fields] for e in ours] == \
            [[e[k] for k in fields] for e in theirs]
        assert len(ours) >= 5           # data and holes alternate
        converted = tmp_path / "converted.qcow2"
        hosts.client.run(NBDPLUG + ["convert", "-O", "qcow2", uri,
                                    converted], cwd=REPO)
        qemu_img_compare(str(converted), raw, "qcow2", "raw")


def test_psk_refusals(hosts, pki, images, tmp_path):
    raw, _ = images
    ip = hosts.server.ip
    with remote_server(hosts, tmp_path, "--tls-psk", pki.psk,
                       "--export", f"a={raw}:raw") as (port, _):
        # Plain TCP to a TLS-only server.
        err = refused(hosts.client.run(
            ["nbdinfo", "--size", f"nbd://{ip}:{port}/a"], check=False))
        assert "TLS" in err
        err = refused(hosts.client.run(
            ["qemu-img", "info", "--image-opts",
             qemu_nbd_opts(ip, port, "a", tls=False)], check=False))
        assert "TLS negotiation required" in err
        # TLS without the key; an identity the server does not know; the
        # right identity with another key.
        for uri in (f"nbds://alice@{ip}:{port}/a",
                    psk_uri(ip, port, "a", pki, pki.psk_bob, user="bob"),
                    psk_uri(ip, port, "a", pki, pki.psk_wrong)):
            err = refused(hosts.client.run(["nbdinfo", "--size", uri],
                                           check=False))
            assert re.search("TLS|gnutls|handshake", err), err
        # nbdplug says so in one line.
        proc = hosts.client.run(NBDPLUG + ["info", psk_uri(
            ip, port, "a", pki, pki.psk_wrong)], cwd=REPO, check=False)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr
        # And the right key still works.
        out = hosts.client.run(["nbdinfo", "--size",
                                psk_uri(ip, port, "a", pki)]).stdout
        assert int(out) == 16 * MiB


def test_ipv6_listen(hosts, pki, images, tmp_path):
    """qemu-img and nbdplug over IPv6 with TLS.  (nbdinfo and nbdcopy
    cannot: libnbd 1.14 sends the IPv6 literal as TLS server name, which
    RFC 6066 forbids and GnuTLS servers such as nbdkit's refuse.)"""
    raw, _ = images
    ip6 = hosts.server.ip6
    with remote_server(hosts, tmp_path, "--tls-psk", pki.psk, "--export",
                       f"v6={raw}", ip6=True) as (port, uris):
        assert uris == [f"nbds://[{ip6}]:{port}/v6"]
        hosts.client.run(["qemu-img", "compare", *qemu_tls(pki, "psk"),
                          "--image-opts", qemu_nbd_opts(ip6, port, "v6"),
                          f"driver=raw,file.filename={raw}"])
        copy = tmp_path / "copy.raw"
        hosts.client.run(NBDPLUG + ["convert", "-O", "raw", psk_uri(
            f"[{ip6}]", port, "v6", pki), copy], cwd=REPO)
        assert copy.read_bytes() == open(raw, "rb").read()
        err = refused(hosts.client.run(
            NBDPLUG + ["info", psk_uri(f"[{ip6}]", port, "v6", pki,
                                       pki.psk_wrong)], cwd=REPO,
            check=False))
        assert len(err.strip().splitlines()) == 1


# --- TLS with X.509 certificates --------------------------------------

def test_x509_clients_and_peer_verification(hosts, pki, images, tmp_path):
    raw, qcow2 = images
    ip = hosts.server.ip
    with remote_server(hosts, tmp_path, "--tls-certs", pki.server,
                       "--tls-verify-peer",
                       "--export", f"disk={qcow2}") as (port, _):
        uri = x509_uri(ip, port, "disk", pki.client)
        names = [e["export-name"] for e in json.loads(hosts.client.run(
            ["nbdinfo", "--list", "--json", uri]).stdout)["exports"]]
        assert names == ["disk"]
        copy = tmp_path / "copy.raw"
        hosts.client.run(["nbdcopy", uri, copy])
        assert copy.read_bytes() == open(raw, "rb").read()
        hosts.client.run(["qemu-img", "compare", *qemu_tls(pki, "x509"),
                          "--image-opts", qemu_nbd_opts(ip, port, "disk"),
                          f"driver=raw,file.filename={raw}"])
        converted = tmp_path / "converted.raw"
        hosts.client.run(NBDPLUG + ["convert", "-O", "raw", uri, converted],
                         cwd=REPO)
        assert converted.read_bytes() == open(raw, "rb").read()

        # No client certificate, or one from another CA: refused.
        only_ca = tmp_path / "only-ca"
        only_ca.mkdir()
        (only_ca / "ca-cert.pem").write_bytes(
            (pki.client / "ca-cert.pem").read_bytes())
        for certs in (only_ca, pki.rogue):
            err = refused(hosts.client.run(
                ["nbdinfo", "--size", x509_uri(ip, port, "disk", certs)],
                check=False))
            assert re.search("TLS|gnutls|handshake", err), err
        refused(hosts.client.run(["nbdinfo", "--size",
                                  f"nbd://{ip}:{port}/disk"], check=False))


# --- named exports, writability, limits, the allow-list ---------------

def test_config_exports_readonly_writable_limit(hosts, pki, images,
                                                tmp_path):
    raw, qcow2 = images
    ip = hosts.server.ip
    conf = tmp_path / "exports.conf"
    conf.write_text(f"""
[server]
tls-psk = {pki.psk}
allow = {hosts.client.ip}, {hosts.client.ip6}

[export ro]
image = {raw}
format = raw
description = the read-only one

[export rw]
image = {os.path.basename(qcow2)}
format = qcow2
writable = yes
limit = 1
""")
    before = open(raw, "rb").read()
    mtime = os.stat(raw).st_mtime_ns
    with remote_server(hosts, tmp_path, "--config", conf) as (port, uris):
        assert uris == [f"nbds://{ip}:{port}/ro", f"nbds://{ip}:{port}/rw"]
        listing = json.loads(hosts.client.run(
            ["nbdinfo", "--list", "--json",
             psk_uri(ip, port, "", pki)]).stdout)
        exports = {e["export-name"]: e for e in listing["exports"]}
        assert exports["ro"]["description"] == "the read-only one"
        assert exports["ro"]["is_read_only"]
        assert not exports["rw"]["is_read_only"]

        # The read-only export refuses writes even from a client that
        # ignores the read-only flag (the server has writable exports,
        # so nbdkit itself is not read-only).  One connection each: after
        # refusing a write, nbdkit 1.32 loses its place in the TLS stream
        # and drops the client.
        proc = client_python(hosts, """
for call in ("pwrite", "trim", "zero"):
    h = connect(argv[0], strict=False)
    assert h.is_read_only()
    try:
        if call == "pwrite":
            h.pwrite(b"x" * 4096, 0)
        else:
            getattr(h, call)(4096, 0)
    except nbd.Error as e:
        print(e.errno)
""", psk_uri(ip, port, "ro", pki))
        assert proc.stdout.split() == ["EPERM"] * 3
        proc = hosts.client.run(
            ["qemu-io", *qemu_tls(pki, "psk"), "--image-opts",
             qemu_nbd_opts(ip, port, "ro"), "-c", "write 0 4096"],
            check=False)
        assert proc.returncode != 0
        assert "Permission denied" in proc.stderr

        # The writable one takes writes; while one client holds it, its
        # limit of one connection turns the next away.
        rw = psk_uri(ip, port, "rw", pki)
        holder = client_popen(
            hosts, "h = connect(argv[0])\nprint('connected', flush=True)\n"
            "sys.stdin.read()", rw, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline() == "connected\n"
            err = refused(hosts.client.run(["nbdinfo", "--size", rw],
                                           check=False))
            assert "rw" in err
        finally:
            holder.stdin.close()
            holder.wait(10)
        hosts.client.run(["qemu-io", *qemu_tls(pki, "psk"), "--image-opts",
                          qemu_nbd_opts(ip, port, "rw"),
                          "-c", "write -P 0x5a 1M 3M",
                          "-c", "write -z 12M 64k", "-c", "flush"])

        # An unknown name is an error, never some default image.
        err = refused(hosts.client.run(
            ["nbdinfo", "--size", psk_uri(ip, port, "nosuch", pki)],
            check=False))
        assert "nosuch" in err
        err = refused(hosts.client.run(
            ["nbdinfo", "--size", psk_uri(ip, port, "", pki)], check=False))
        assert "export" in err

    assert open(raw, "rb").read() == before
    assert os.stat(raw).st_mtime_ns == mtime
    run(["qemu-img", "check", "-q", qcow2])
    expect = bytearray(before)
    expect[MiB:4 * MiB] = b"\x5a" * (3 * MiB)
    expect[12 * MiB:12 * MiB + 65536] = bytes(65536)
    got = tmp_path / "got.raw"
    run(["qemu-img", "convert", "-O", "raw", qcow2, got])
    assert got.read_bytes() == bytes(expect)


def test_allow_list_turns_others_away(hosts, pki, images, tmp_path):
    """Only the client host is allowed; the server host itself, connecting
    to the same address, is turned away, and that does not disturb the
    client's connections before or after."""
    raw, _ = images
    ip = hosts.server.ip
    with remote_server(hosts, tmp_path, "--tls-psk", pki.psk,
                       "--allow", f"10.99.0.0/16,{hosts.client.ip}",
                       raw) as (port, _):
        uri = psk_uri(ip, port, "", pki)
        holder = client_popen(
            hosts, "h = connect(argv[0])\nprint(h.get_size(), flush=True)"
            "\nsys.stdin.read()\nprint(len(h.pread(4096, 0)))", uri,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline() == f"{16 * MiB}\n"
            for _ in range(2):
                refused(hosts.server.run(["nbdinfo", "--size", uri],
                                         check=False))
                assert int(hosts.client.run(["nbdinfo", "--size",
                                             uri]).stdout) == 16 * MiB
            out, _ = holder.communicate("", timeout=30)
            assert out == "4096\n"
        finally:
            holder.kill()
            holder.wait()


# --- stopping and crashing with clients connected ---------------------

def test_sigterm_with_idle_client_flushes_and_exits(hosts, pki, images,
                                                    tmp_path):
    _, qcow2 = images
    ip = hosts.server.ip
    with remote_server(hosts, tmp_path, "--tls-psk", pki.psk, "--writable",
                       qcow2) as (port, _):
        client = client_popen(hosts, """
h = connect(argv[0])
h.pwrite(b"\\x77" * 65536, 5 << 20)         # acknowledged, not flushed
print("written", flush=True)
sys.stdin.readline()                       # idle until the server is gone
try:
    h.pread(512, 0)
    print("read after stop")
except nbd.Error as e:
    print("error", e.errno)
""", psk_uri(ip, port, "", pki), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
        try:
            assert client.stdout.readline() == "written\n"
            pid = int((tmp_path / f"server-{port}.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            # nbdkit alone waits for the client forever; ours hangs up.
            deadline = time.monotonic() + 30
            while server._alive(pid):
                assert time.monotonic() < deadline, "server ignored SIGTERM"
                time.sleep(0.05)
            client.stdin.write("go\n")
            client.stdin.flush()
            assert client.stdout.readline().startswith("error ")
        finally:
            client.kill()
            client.wait()
    proc = run(["qemu-img", "check", "--output=json", qcow2])
    assert json.loads(proc.stdout).get("leaks", 0) == 0
    data = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x77 5M 64k",
                qcow2]).stdout
    assert "read 65536/65536" in data


def test_kill9_during_writes(hosts, pki, images, tmp_path):
    """The client sees an error (not wrong data), the image checks clean
    and holds every write the server acknowledged before a flush."""
    raw, qcow2 = images
    ip = hosts.server.ip
    progress = tmp_path / "progress"
    with remote_server(hosts, tmp_path, "--tls-psk", pki.psk, "--writable",
                       qcow2) as (port, _):
        pid = int((tmp_path / f"server-{port}.pid").read_text())
        client = client_popen(hosts, """
h = connect(argv[0])
block = 256 << 10
for i in range(4 * 64):
    data = bytes([i % 251 + 1]) * block
    try:
        h.pwrite(data, (i % 64) * block)
        h.flush()
        back = h.pread(block, (i % 64) * block)
    except nbd.Error as e:
        print("error", e.errno, flush=True)
        break
    if back != data:
        print("wrong data at", i, flush=True)
        break
    with open(argv[1], "a") as f:
        f.write(f"{i}\\n")
""", psk_uri(ip, port, "", pki), progress, stdout=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not progress.exists() or \
                    len(progress.read_text().split()) < 20:
                assert client.poll() is None, client.stdout.read()
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            out, _ = client.communicate(timeout=60)
        finally:
            client.kill()
        assert out.startswith("error "), out
    done = [int(i) for i in progress.read_text().split()]
    proc = run(["qemu-img", "check", "--output=json", qcow2], check=False)
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    assert json.loads(proc.stdout).get("corruptions", 0) == 0
    got = tmp_path / "got.raw"
    run(["qemu-img", "convert", "-O", "raw", qcow2, got])
    image = got.read_bytes()
    block = 256 << 10
    last = {}
    for i in done:                  # flushed, in order: the last one wins
        last[i % 64] = i
    for slot, i in last.items():
        assert image[slot * block:(slot + 1) * block] == \
            bytes([i % 251 + 1]) * block, f"block {slot} (write {i})"


# --- the systemd unit --------------------------------------------------

def unit_settings(path):
    settings = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_systemd_unit_verifies(tmp_path):
    """systemd's own check finds nothing wrong but, on a machine where
    nbdplug is not installed system-wide, its absence."""
    copy = tmp_path / "nbdplug@test.service"
    copy.write_text(open(os.path.join(REPO, "hotplug",
                                      "nbdplug@.service")).read())
    proc = run(["systemd-analyze", "verify", copy], check=False,
               cwd=tmp_path)
    complaints = [line for line in proc.stderr.splitlines()
                  if "Command nbdplug is not executable" not in line]
    assert not complaints, proc.stderr


def test_systemd_unit_starts_and_stops_cleanly(hosts, pki, images, tmp_path):
    """Run the unit's ExecStart the way systemd would (Type=forking, main
    pid from PIDFile=), stop it with SIGTERM, and check that it served
    and flushed."""
    _, qcow2 = images
    unit = unit_settings(os.path.join(REPO, "hotplug", "nbdplug@.service"))
    assert unit["Type"] == "forking"
    assert unit["Restart"] == "on-failure"
    assert "2" in unit["RestartPreventExitStatus"].split()
    port = next(PORTS)
    etc, rundir = tmp_path / "etc", tmp_path / "run"
    etc.mkdir()
    rundir.mkdir()
    (etc / "guests.conf").write_text(f"""
[server]
listen = {hosts.server.ip}:{port}
tls-psk = {pki.psk}

[export g]
image = {qcow2}
writable = yes
""")

    def expand(text):
        return (text.replace("%i", "guests").replace("/etc/nbdplug", str(etc))
                .replace("/run/nbdplug", str(rundir)))

    os.makedirs(expand("/run/" + unit["RuntimeDirectory"]))
    argv = expand(unit["ExecStart"]).split()
    assert argv[0] == "nbdplug"
    hosts.server.run(NBDPLUG + argv[1:], cwd=REPO)
    pid = int(open(expand(unit["PIDFile"])).read())
    uri = psk_uri(hosts.server.ip, port, "g", pki)
    hosts.client.run(["qemu-io", *qemu_tls(pki, "psk"), "--image-opts",
                      qemu_nbd_opts(hosts.server.ip, port, "g"),
                      "-c", "write -P 0x42 0 1M"])
    assert int(hosts.client.run(["nbdinfo", "--size", uri]).stdout) == \
        16 * MiB
    os.kill(pid, signal.SIGTERM)                # systemctl stop
    deadline = time.monotonic() + 30
    while server._alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run(["qemu-img", "check", "-q", qcow2])
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x42 0 1M", qcow2])


def test_serve_errors_are_one_line(hosts, pki, images, tmp_path):
    """A second server on a port in use: one line, exit 2."""
    raw, _ = images
    with remote_server(hosts, tmp_path, "--tls-psk", pki.psk,
                       raw) as (port, _):
        proc = hosts.server.run(
            NBDPLUG + ["serve", "--tls-psk", pki.psk, "--listen",
                       f"{hosts.server.ip}:{port}", "--pidfile",
                       tmp_path / "second.pid", raw], cwd=REPO, check=False)
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert "Address already in use" in line
        assert f"{hosts.server.ip}:{port}" in line
