"""Test harness for tapbridge: C programs built at test time from Xen's
installed headers (the ABI probe and a frontend on ring.h's macros),
and drivers for the frontend and for `tapbridge serve-shm`.

    fe = Frontend(shm_dir, order=2, protocol="x86_32-abi", start=2**32 - 5)
    be = Backend(shm_dir, image, order=2, protocol="x86_32-abi")
    fe.req(BLKIF_OP_WRITE, 0xdead, sector=8, segs=[(3, 0, 7)])
    fe.push()
    assert fe.get(1) == [(0xdead, BLKIF_OP_WRITE, 0)]
"""

import contextlib
import functools
import mmap
import os
import re
import queue
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PAGE = 4096
PROTO_ARG = {"x86_64-abi": "x86_64", "x86_32-abi": "x86_32"}


@functools.lru_cache(maxsize=None)
def _build_dir():
    return tempfile.mkdtemp(prefix="tapbridge-build.")


def _gcc(args):
    proc = subprocess.run(["gcc"] + args, cwd=HERE, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise AssertionError(f"gcc {' '.join(args)} failed:\n{proc.stderr}")


@functools.lru_cache(maxsize=None)
def frontend_binary():
    out = os.path.join(_build_dir(), "frontend")
    _gcc(["-O2", "-Wall", "-Werror", "-o", out, "frontend.c"])
    return out


@functools.lru_cache(maxsize=None)
def probe(i386=False):
    """{name: value} from probe.c compiled against the installed headers
    (i386: with gcc -m32, where struct blkif_request is the x86_32 ABI)."""
    out = os.path.join(_build_dir(), "probe32.s" if i386 else "probe.s")
    _gcc((["-m32", "-ffreestanding", "-DPROBE_I386"] if i386 else [])
         + ["-S", "-o", out, "probe.c"])
    values = {}
    with open(out) as f:
        text = f.read()
    for name, kind, value in re.findall(
            r"^probe_(\w+):\n\s+\.(long|zero|string)\s+(.*)$", text, re.M):
        values[name] = {"long": int, "zero": lambda v: 0,
                        "string": lambda v: v.strip('"')}[kind](value)
    return values


def sector_data(sector, count, seed):
    """`count` sectors of bytes that name their seed and sector."""
    return b"".join(struct.pack("<QQ", seed, sector + i) * 32
                    for i in range(count))


class ShmDir:
    """A shared-memory transport directory with `pages` grant pages,
    mapped here so tests can fill and inspect guest memory."""

    def __init__(self, path, pages):
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        grants = os.path.join(self.path, "grants")
        with open(grants, "wb") as f:
            f.truncate(pages * PAGE)
        with open(grants, "r+b") as f:
            self.grants = mmap.mmap(f.fileno(), pages * PAGE)

    def page(self, gref):
        return self.grants[gref * PAGE:(gref + 1) * PAGE]

    def gather(self, segments):
        """The bytes of (gref, first_sect, last_sect) segments, in order."""
        return b"".join(self.page(g)[f * 512:(last + 1) * 512]
                        for g, f, last in segments)

    def fill(self, gref, data):
        assert len(data) == PAGE
        self.grants[gref * PAGE:(gref + 1) * PAGE] = data

    def ring_bytes(self):
        with open(os.path.join(self.path, "ring"), "rb") as f:
            return f.read()

    def close(self):
        self.grants.close()


class Frontend:
    """The C frontend as a child process, one command at a time."""

    def __init__(self, shm, order=0, protocol="x86_64-abi", start=0):
        self.proc = subprocess.Popen(
            [frontend_binary(), shm.path, str(order), PROTO_ARG[protocol],
             str(start)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            bufsize=1)
        self._lines = queue.SimpleQueue()
        threading.Thread(target=self._reader, daemon=True).start()
        assert self._line() == "ready"

    def _reader(self):
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _line(self, timeout=60):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("frontend did not answer") from None
        assert line is not None, f"frontend exited ({self.proc.wait()})"
        return line

    def send(self, line):
        self.proc.stdin.write(line + "\n")

    def req(self, op, req_id, sector, segs, nseg=None):
        nseg = len(segs) if nseg is None else nseg
        self.send(f"req {op} {req_id:#x} {sector:#x} {nseg} " +
                  " ".join(f"{g}:{f}:{last}" for g, f, last in segs))

    def discard(self, req_id, sector, count, flag=0):
        self.send(f"discard {req_id:#x} {sector} {count} {flag}")

    def indirect(self, iop, req_id, sector, nseg, grefs):
        self.send(f"indirect {iop} {req_id:#x} {sector} {nseg} " +
                  " ".join(str(g) for g in grefs))

    def push(self):
        """Publish queued requests; whether ring.h said to notify."""
        self.send("push")
        return self._expect("notify") == 1

    def get(self, n, timeout_ms=20000):
        """Wait for n responses like an interrupt handler; a list of
        (id, op, status).  Fails if the backend stops notifying."""
        self.send(f"get {n} {timeout_ms}")
        rsps, last = self._responses()
        assert last == f"got {n}", f"{last} of {n} responses: {rsps}"
        return rsps

    def poll(self):
        self.send("poll")
        return self._responses()[0]

    def _responses(self):
        rsps = []
        while True:
            line = self._line()
            if not line.startswith("rsp "):
                return rsps, line
            _, rid, op, status = line.split()
            rsps.append((int(rid, 16), int(op), int(status)))

    def _expect(self, word):
        line = self._line()
        assert line.startswith(word + " "), line
        return int(line.split()[1])

    def final(self):
        self.send("final")
        return self._expect("more")

    def free(self):
        self.send("free")
        return self._expect("free")

    def state(self):
        self.send("state")
        line = self._line()
        names = ("req_prod req_event rsp_prod rsp_event req_prod_pvt "
                 "rsp_cons size kicks").split()
        values = line.split()
        assert values[0] == "state", line
        return dict(zip(names, map(int, values[1:])))

    def poke(self, field, value):
        self.send(f"poke {field} {value}")

    def recover(self):
        self.send("recover")
        rsps, last = self._responses()
        assert last.startswith("recovered "), last
        return rsps, int(last.split()[1])

    def bench(self, mode, bs, qd, seconds, disk_bytes):
        self.send(f"bench {mode} {bs} {qd} {seconds} {disk_bytes}")
        words = self._line(timeout=seconds + 120).split()
        assert words[0] == "bench", words
        return int(words[1]), int(words[2]), int(words[3]) / 1e9

    def close(self):
        if self.proc.poll() is None:
            self.send("quit")
            self.proc.stdin.close()
            self.proc.wait(10)


class Backend:
    """`tapbridge serve-shm` as a child process, started once it serves."""

    def __init__(self, shm, image, fmt="raw", order=0,
                 protocol="x86_64-abi", readonly=False, extra=()):
        argv = [sys.executable, "-m", "tapbridge.cli", "serve-shm",
                shm.path, str(image), "-f", fmt, "--order", str(order),
                "--protocol", protocol, *extra]
        if readonly:
            argv.append("--readonly")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            self.proc.wait(10)
            raise AssertionError(f"serve-shm did not start: {line}"
                                 f"{self.proc.stderr.read()}")
        self.banner = line.strip()

    def stop(self, sig=signal.SIGTERM):
        """Signal the backend; its exit status and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(30)
        finally:
            err = self.proc.stderr.read()
            self.proc.stdout.close()
            self.proc.stderr.close()
        return rc, err


@contextlib.contextmanager
def in_thread(run, stop):
    """Run `run()` in a thread for the block; `stop()` ends it."""
    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        stop()
        thread.join(30)


@contextlib.contextmanager
def dispatcher_thread(shm, disk, order=0, protocol="x86_64-abi",
                      persistent=False, **kw):
    """The dispatcher serving `disk` in this process (so tests can watch
    the driver calls), on a ring the frontend has already initialised."""
    from tapbridge.abi import PROTOCOLS
    from tapbridge.dispatch import Dispatcher
    from tapbridge.shm import ShmTransport
    transport = ShmTransport(shm.path, order, persistent=persistent)
    dispatcher = Dispatcher(disk, transport, PROTOCOLS[protocol], **kw)
    try:
        with in_thread(dispatcher.serve, dispatcher.stop):
            yield dispatcher
    finally:
        dispatcher.close()
        transport.close()


@contextlib.contextmanager
def vbd_backend(xs, transport_factory):
    """`tapbridge serve-xen`'s backend in this process, on the test
    xenstore, with `transport_factory` standing in for the hypervisor."""
    from tapbridge.vbd import VbdBackend, Xenstore
    store = Xenstore(xs.path)
    vbd = VbdBackend(store, transport_factory, max_queues=2)
    try:
        with in_thread(vbd.run, vbd.stop):
            yield vbd
    finally:
        store.close()


class WatchedDisk:
    """A Disk wrapper that logs every driver call (and the thread that
    made it), can hold calls at chosen offsets until the test releases
    them, and can make every call wait `delay` seconds."""

    def __init__(self, disk):
        self.disk = disk
        self.size = disk.size
        self.readonly = disk.readonly
        self.can_trim = disk.can_trim
        self.can_zero = disk.can_zero
        self.calls = []
        self.threads = []
        self.delay = 0
        self.gates = {}         # offset -> (started, release) events
        self._lock = threading.Lock()

    def hold(self, offset):
        self.gates[offset] = (threading.Event(), threading.Event())
        return self.gates[offset]

    def _call(self, name, length, offset, fn):
        with self._lock:
            self.calls.append((name, offset, length))
            self.threads.append(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        gate = self.gates.get(offset)
        if gate is not None and name != "flush":
            gate[0].set()
            assert gate[1].wait(60)
        result = fn()
        with self._lock:
            self.calls.append((name + " done", offset, length))
        return result

    def pread(self, buf, offset):
        return self._call("pread", len(buf), offset,
                          lambda: self.disk.pread(buf, offset))

    def pwrite(self, buf, offset, fua=False):
        return self._call("pwrite", len(buf), offset,
                          lambda: self.disk.pwrite(buf, offset, fua))

    def flush(self):
        return self._call("flush", 0, None, self.disk.flush)

    def trim(self, count, offset, fua=False):
        return self._call("trim", count, offset,
                          lambda: self.disk.trim(count, offset, fua))

    def zero(self, count, offset, may_trim=False, fua=False):
        return self._call("zero", count, offset,
                          lambda: self.disk.zero(count, offset, may_trim,
                                                 fua))


def wait_for(predicate, timeout=10, what="condition"):
    """Poll `predicate` until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


BACKEND = "/local/domain/0/backend/vbd/{domid}/{devid}"
FRONTEND = "/local/domain/{domid}/device/vbd/{devid}"


def libxl_add_vbd(xs, target, domid=1, devid=51712, mode="w",
                  script="/etc/xen/scripts/block-tapbridge"):
    """The keys libxl's device_disk_add writes, in one transaction, for
    `disk = ['backendtype=phy,script=...,target=TARGET']`."""
    be, fe = BACKEND.format(domid=domid, devid=devid), \
        FRONTEND.format(domid=domid, devid=devid)
    values = {f"{be}/{k}": v for k, v in {
        "frontend": fe, "frontend-id": domid, "online": 1, "removable": 0,
        "bootable": 1, "state": 1, "dev": "xvda", "type": "phy",
        "mode": mode, "device-type": "disk", "params": target,
        "script": script, "discard-enable": 1,
        "specification": "xen"}.items()}
    values.update({f"{fe}/{k}": v for k, v in {
        "backend": be, "backend-id": 0, "state": 1,
        "virtual-device": devid, "device-type": "disk",
        "trusted": 1}.items()})
    xs.write_all(values)
    return be, fe


@pytest.fixture
def xs():
    """A xenstore server for the test; clients find it via its path."""
    from xsserver import XenstoreServer
    d = tempfile.mkdtemp(prefix="xs.")      # short: sun_path
    with XenstoreServer(os.path.join(d, "socket")) as server:
        yield server
    os.rmdir(d)


def hotplug(xs, script, command, xenbus_path="backend/vbd/1/51712",
            env=None):
    """Run a hotplug script with the environment libxl's get_hotplug_env
    gives it (and `env`), and the venv's nbdplug on PATH."""
    env = dict(env or {}, PATH=os.path.dirname(sys.executable) + ":" +
               os.environ["PATH"], XENSTORED_PATH=xs.path, script=script,
               XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
    if xenbus_path is not None:
        env["XENBUS_PATH"] = xenbus_path
    return subprocess.run([script, command], stdin=subprocess.DEVNULL,
                          env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def odd_dir(tmp_path):
    """A directory whose name has the commas and colons target= allows."""
    d = tmp_path / "vm,disks:a"
    d.mkdir()
    return d


def qcow2_with_data(path):
    """A 16 MiB qcow2 written by qemu-io: 0x3c over [1 MiB, 1 MiB + 64k)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path),
                    "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 1M 64k",
                    str(path)], check=True, capture_output=True)
    return str(path)
