"""A moving disk whose source vanishes without closing the connection
(its server stopped with SIGSTOP, as a host that froze or a network that
drops every packet): only requests that need the source wait for it.

The moving disk is served by nbdplug; the source by nbdplug too, over
nbd+unix:// or over nbds:// (TLS with a pre-shared key).  With the source
stopped, clients A and C read a cluster that is not local yet: they
wait (C behind A's fetch), then get EIO at the patience bound.
Meanwhile client B, on its own connection, reads, writes, zeroes, trims,
flushes and asks block status of local clusters (and zeroes a missing
one, which needs nothing from the source), all while A and C still
wait.  Once the source runs again, A's read succeeds and the move
completes."""

import os
import signal
import socket
import threading
import time

import nbd
import pytest

from conftest import nbdplug, qemu_img_info, run, served
from migration import MiB, SourceServer, source_image
from nbdplug.ops import migrate

PATIENCE = 3.0
CLUSTER = 65536


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NBDPLUG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NBDPLUG_SOURCE_PATIENCE", str(PATIENCE))


class TlsSource:
    """`nbdplug serve` of the source over TLS (pre-shared key) on
    loopback TCP."""

    def __init__(self, image, tmp_path):
        self.image = image
        self.pidfile = str(tmp_path / "source.pid")
        keys = str(tmp_path / "keys.psk")
        run(["psktool", "-u", "alice", "-p", keys])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.keys = keys
        self.uri = (f"nbds://alice@127.0.0.1:{self.port}/disk"
                    f"?tls-psk-file={keys}")

    def __enter__(self):
        nbdplug("serve", "--listen", f"127.0.0.1:{self.port}", "--pidfile",
                self.pidfile, "--tls-psk", self.keys, "--export",
                f"disk={self.image}:raw")
        return self

    def __exit__(self, *exc):
        if os.path.exists(self.pidfile):
            nbdplug("stop", self.pidfile)


def source_server(transport, image, tmp_path):
    if transport == "unix":
        return SourceServer(image, "raw")
    return TlsSource(image, tmp_path)


def pid_of(srv):
    with open(srv.pidfile) as f:
        return int(f.read())


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_stopped_source_stalls_only_its_readers(transport, tmp_path):
    image, model = source_image(str(tmp_path), "raw")
    assert any(model[9 * MiB:9 * MiB + CLUSTER])
    local = str(tmp_path / "local.qcow2")
    with source_server(transport, image, tmp_path) as source:
        assert source.uri.startswith("nbd+unix://" if transport == "unix"
                                     else "nbds://")
        # A fill slow enough to leave most clusters remote.
        nbdplug("migrate", "start", "--no-wait", "--rate", "64K",
                source.uri, local)
        with served(local, "qcow2") as srv:
            a, b, c = (connect(srv.uri) for _ in range(3))
            try:
                # Local from now on: copied on read, and written.
                assert b.pread(MiB, 0) == model[:MiB]
                b.pwrite(b"\x5a" * CLUSTER, 20 * MiB)
                os.kill(pid_of(source), signal.SIGSTOP)
                try:
                    stalled([a, c], b, model)
                finally:
                    os.kill(pid_of(source), signal.SIGCONT)
                # The source is back: the same read now succeeds.
                assert a.pread(CLUSTER, 9 * MiB) == \
                    model[9 * MiB:9 * MiB + CLUSTER]
            finally:
                for h in (a, b, c):
                    h.shutdown()
        st = migrate.status(local)
        assert st["state"] in ("filling", "paused", "stopped"), st
        nbdplug("migrate", "resume", "--rate", "0", local)
    assert "backing-filename" not in qemu_img_info(local)
    expect = bytearray(model)
    expect[20 * MiB:20 * MiB + CLUSTER] = b"\x5a" * CLUSTER
    expect[2 * MiB:2 * MiB + CLUSTER] = bytes(CLUSTER)
    expect[12 * MiB:12 * MiB + CLUSTER] = bytes(CLUSTER)
    copy = tmp_path / "copy.raw"
    run(["qemu-img", "convert", "-O", "raw", local, str(copy)])
    assert copy.read_bytes() == bytes(expect)


def stalled(readers, b, model):
    """The readers (A, and C behind A's fetch of the same cluster) wait
    on the stopped source; B's local work must not."""
    outcome = {}

    def read_missing(i, h):
        t0 = time.monotonic()
        try:
            h.pread(CLUSTER, 9 * MiB)
            outcome[i] = "read"
        except nbd.Error as e:
            outcome[i] = e.errno
        outcome[i, "took"] = time.monotonic() - t0

    threads = [threading.Thread(target=read_missing, args=(i, h))
               for i, h in enumerate(readers)]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(0.2)                     # they wait on the source now
    for _ in range(20):
        assert b.pread(4096, 64 * 1024) == model[65536:65536 + 4096]
        assert b.pread(8192, CLUSTER - 4096) == \
            model[CLUSTER - 4096:CLUSTER + 4096]    # two clusters
        b.pwrite(b"\x5a" * 4096, 20 * MiB)
        assert b.pread(4096, 20 * MiB) == b"\x5a" * 4096
    b.zero(CLUSTER, 2 * MiB)                    # local
    b.zero(CLUSTER, 12 * MiB)                   # missing: needs no source
    assert b.pread(CLUSTER, 12 * MiB) == bytes(CLUSTER)
    b.trim(CLUSTER, 2 * MiB)
    b.flush()
    extents = []
    b.block_status(MiB, 0, lambda ctx, off, e, err: extents.append(e))
    assert extents and sum(extents[0][::2]) >= MiB
    b_took = time.monotonic() - t0
    # Everything B did came before the readers' answers, well inside
    # the bound.
    assert not outcome, outcome
    assert b_took < PATIENCE / 2, b_took
    for thread in threads:
        thread.join(PATIENCE * 4)
        assert not thread.is_alive(), "a read of a stopped source hangs"
    # Each reader gets EIO at the bound (C's wait for A's fetch counts).
    for i in range(len(readers)):
        assert outcome[i] == "EIO", outcome
        assert PATIENCE - 0.5 <= outcome[i, "took"] < PATIENCE * 1.5, \
            outcome
