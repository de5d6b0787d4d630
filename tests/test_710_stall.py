"""No client stalls the server: `nbdplug serve` on loopback TCP (plain
and TLS with pre-shared keys) and on a Unix socket, with 1, 10 and 100
clients that connect and never finish their handshake, while a client
connected before them reads; then clients that take too long over their
handshake (idle, one byte a second, a TLS handshake left half done,
negotiating after TLS) are hung up at --handshake-limit, and a client
with its export open is not, however long it idles."""

import contextlib
import os
import random
import select
import socket
import struct
import threading
import time

import nbd
import pytest

from conftest import NBDPLUG, REPO, run
from nbdplug.serve import nbdkit as server

MiB = 1 << 20
SIZE = 64 * MiB
BLOCK = 64 << 10

# The NBD handshake (NBD protocol, "Newstyle negotiation").
GREETING = 18                       # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
NBD_OPT_STARTTLS = 5
REPLY = 20                          # option reply header, no payload
TLS_RECORD_HEADER = b"\x16\x03\x01\x02\x00"     # a handshake record, 512 B


def option(code, data=b""):
    return b"IHAVEOPT" + struct.pack(">II", code, len(data)) + data


def recv_exactly(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "server hung up"
        buf += chunk
    return buf


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("stall") / "disk.raw"
    path.write_bytes(os.urandom(SIZE))
    return str(path)


@pytest.fixture(scope="module")
def psk(tmp_path_factory):
    path = tmp_path_factory.mktemp("psk") / "keys.psk"
    run(["psktool", "-u", "alice", "-p", path])
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`nbdplug serve` of `image` over `transport` ("tcp", "tls" or
    "unix"): how to reach it, raw and through libnbd."""

    def __init__(self, transport, image, psk, tmp_path, limit):
        self.transport = transport
        self.pidfile = str(tmp_path / "server.pid")
        args = ["serve", "-f", "raw", "--pidfile", self.pidfile,
                "--handshake-limit", str(limit), image]
        if transport == "unix":
            self.address = str(tmp_path / "nbd.sock")
            self.uri = server.unix_uri(self.address)
            args += ["--socket", self.address]
        else:
            self.address = ("127.0.0.1", free_port())
            args += ["--listen", "127.0.0.1:%d" % self.address[1]]
            self.uri = server.tcp_uri(*self.address)
            if transport == "tls":
                args += ["--tls-psk", psk]
                self.uri = (f"nbds://alice@127.0.0.1:{self.address[1]}/"
                            f"?tls-psk-file={psk}")
        run(NBDPLUG + args, cwd=REPO)

    def stop(self):
        server.stop(self.pidfile)

    def socket(self):
        family = socket.AF_UNIX if self.transport == "unix" \
            else socket.AF_INET
        sock = socket.socket(family)
        sock.connect(self.address)
        return sock

    def connect(self, negotiate=False):
        """A libnbd handle with the export open, or (negotiate=True)
        still negotiating, past TLS when there is TLS."""
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.set_opt_mode(negotiate)
        h.connect_uri(self.uri)
        return h

    def starttls_then_silence(self):
        """Into the TLS handshake, then silent: the first record's header
        and none of its body."""
        sock = self.socket()
        recv_exactly(sock, GREETING)
        sock.sendall(CLIENT_FLAGS + option(NBD_OPT_STARTTLS))
        recv_exactly(sock, REPLY)
        sock.sendall(TLS_RECORD_HEADER)
        return sock

    def new_client_seconds(self):
        """How long a new client takes to connect and learn the size."""
        start = time.monotonic()
        out = run(["nbdinfo", "--size", self.uri], timeout=30).stdout
        assert int(out) == SIZE
        return time.monotonic() - start


@contextlib.contextmanager
def serving(transport, image, psk, tmp_path, limit=0):
    srv = Server(transport, image, psk, tmp_path, limit)
    try:
        yield srv
    finally:
        srv.stop()


def idle_clients(srv, count):
    """`count` clients that connected and stopped short of an export:
    silent sockets, clients negotiating (past TLS with the key) and,
    over TLS, clients halfway into the TLS handshake."""
    kinds = [srv.socket, lambda: srv.connect(negotiate=True)]
    if srv.transport == "tls":
        kinds.append(srv.starttls_then_silence)
    return [kinds[i % len(kinds)]() for i in range(count)]


def close_all(clients):
    for c in clients:
        if isinstance(c, socket.socket):
            c.close()
        else:
            with contextlib.suppress(nbd.Error):
                c.shutdown()


def within(seconds, fn):
    """fn(), or fail if it has not returned after `seconds` (a stalled
    server; the thread is left to end with the server)."""
    result = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert result, f"no answer within {seconds} s: the server stalled"
    return result[0]


def reads_per_second(h, rounds=3, seconds=0.4):
    """The best of `rounds` runs of random 64 KiB reads, one at a time
    (so every request waits for the server's answer)."""
    rng = random.Random(1)
    best = 0
    for _ in range(rounds):
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            h.pread(BLOCK, rng.randrange(SIZE // BLOCK) * BLOCK)
            n += 1
        best = max(best, n / seconds)
    return best


def crowding(srv, established, count):
    """(the established client's reads per second with `count` idle
    clients over those alone, a new client's seconds to connect)."""
    alone = within(20, lambda: reads_per_second(established))
    idle = idle_clients(srv, count)
    try:
        crowded = within(20, lambda: reads_per_second(established))
        seconds = within(20, srv.new_client_seconds)
    finally:
        close_all(idle)
    return crowded / alone, seconds


@pytest.mark.parametrize("transport", ["tcp", "tls", "unix"])
def test_idle_handshakes_stall_nobody(transport, image, psk, tmp_path):
    with serving(transport, image, psk, tmp_path) as srv:
        established = srv.connect()
        try:
            for count in (1, 10, 100):
                # A stall fails every try, a busy machine now and then.
                tries = [crowding(srv, established, count)]
                while tries[-1][0] < 0.8 and len(tries) < 3:
                    tries.append(crowding(srv, established, count))
                assert tries[-1][0] >= 0.8, (count, tries)
                assert all(seconds < 1 for _, seconds in tries), \
                    (count, tries)
        finally:
            established.shutdown()


def slowloris(sock, data, seconds):
    """Send `data` one byte a second for up to `seconds`; the time the
    server hung up after, or None if it did not."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > seconds:
            return None
        try:
            sock.send(bytes([byte]))
        except OSError:
            return time.monotonic() - start
        if select.select([sock], [], [], 1.0)[0]:
            try:
                if not sock.recv(4096):
                    return time.monotonic() - start
            except OSError:
                return time.monotonic() - start
    return None


def hung_up(sock):
    sock.settimeout(5)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_handshake_limit_hangs_up_slow_clients(transport, image, psk,
                                              tmp_path):
    limit = 2
    with serving(transport, image, psk, tmp_path, limit) as srv:
        established = srv.connect()             # idles past the limit
        limit_passed = time.monotonic() + limit + 0.5
        silent = srv.socket()
        negotiating = srv.connect(negotiate=True)
        informed = srv.connect(negotiate=True)
        informed.opt_info()                     # opens, closes, negotiates
        if transport == "tls":
            # Into TLS at once, then its first record a byte a second.
            slow = srv.starttls_then_silence()
            slow_data = bytes(range(1, 100))
            halfway = srv.starttls_then_silence()
        else:
            slow = srv.socket()
            slow_data = CLIENT_FLAGS + option(7, bytes(6))  # NBD_OPT_GO
            halfway = None
        try:
            # One byte a second: hung up at the limit, and meanwhile a
            # new client is served at once.
            assert srv.new_client_seconds() < 1
            after = slowloris(slow, slow_data, limit + 5)
            assert after is not None, "a slowloris client was kept"
            assert after < limit + 3
            assert hung_up(silent)
            if halfway is not None:
                assert hung_up(halfway)
            for h in (negotiating, informed):
                with pytest.raises(nbd.Error):
                    h.opt_go()
            # The client with its export open stays, and so does the
            # server's welcome for new ones.
            time.sleep(max(0, limit_passed - time.monotonic()))
            assert established.pread(BLOCK, 0) == open(image, "rb").read(
                BLOCK)
            assert srv.new_client_seconds() < 1
        finally:
            established.shutdown()
            close_all([silent, slow] + ([halfway] if halfway else []))


def test_handshake_limit_settings(image, tmp_path):
    proc = run(NBDPLUG + ["serve", "--listen", "127.0.0.1:1",
                          "--handshake-limit", "-1", image],
               cwd=REPO, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == \
        "nbdplug: a handshake limit of -1 seconds?  (0 is no limit)"
    conf = tmp_path / "s.conf"
    conf.write_text(f"[server]\nlisten = 127.0.0.1:1\nhandshake-limit = "
                    f"soon\n[export a]\nimage = {image}\n")
    proc = run(NBDPLUG + ["serve", "--config", conf], cwd=REPO, check=False)
    assert proc.returncode == 2
    assert "handshake-limit=soon: expected a number of seconds" in \
        proc.stderr
