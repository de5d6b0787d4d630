"""The live manager of a fast device, in the server's own process and
beside its request path: it never runs inside a request callback, whose
only part is note(), one deque append.

    start:  prepare_writes (first-write metadata, durable), the whole
            host mapping as a Layout, the bounded table pinned, then
            created (dmsetup) or loaded into the device a restart left
            suspended.
    rounds: every INTERVAL, the ranges requests touched are read again;
            if the table changes (a write allocated: promotion), reload:
              pin old + new, load (inactive), suspend (waits for the
              requests in flight), check, resume, pin new only.
            The check: a trim or zero that finished after the ranges
            were read and touches a newly direct range may have changed
            it (zero flag, freed cluster), so that table is dropped
            (cleared, the old one resumed) and the range read again
            next round.  Writes cannot unmake a plain range: a driver
            writes plain ranges in place.
            A device the new table no longer uses is flushed before the
            resume (the driver's files; a host file dropped), so a flush
            on the dm device, which reaches every device of the live
            table, still covers every write acknowledged before it.
    pins:   Disk.set_pins with every host range a loaded table maps (the
            live one and, during a reload, the new one): the driver
            keeps what it frees there in quarantine until unpinned.

A control socket (JSON, one request and one reply a connection) takes
start, status, where (what the live table does with a guest offset),
stop (no more rounds; before a restart or detach) and release (drop every
pin, once no table of ours is live).
"""

import collections
import contextlib
import fcntl
import json
import os
import socket
import struct
import threading
import time

from nbdplug.disk import Pins
from nbdplug.errors import UsageError

from . import fast
from . import table as dmtable
from .ioctl import Device
from .table import SECTOR

INTERVAL = 0.05             # seconds between rounds: the promotion batch
LOG_LIMIT = 1 << 20         # past this many notes, read everything again
BLKGETSIZE64 = 0x80081272
LOOP_SET_CAPACITY = 0x4C07


class Manager:
    def __init__(self, disk, control, device=Device, limit=None):
        self.disk = disk
        self.control = control
        self.make_device = device
        self.limit = limit or fast.MAX_TARGETS
        self.log = collections.deque()      # (offset, count, frees)
        self.running = False
        self.device = self.layout = None
        self.loaded = []                    # pieces of the live table
        self.nbd = None
        self.loops = {}                     # host path -> device
        self.sizes = {}                     # host path -> device bytes
        self.readonly = True
        self.stats = collections.Counter()
        self.last_reload = None             # seconds a reload took
        self.last_error = None
        self.overflow = False               # notes were dropped
        self._lock = threading.Lock()       # one round or command at a time
        self._stop = threading.Event()
        self._thread = None
        self._sock = None

    # --- the request path ------------------------------------------------

    def note(self, offset, count, frees=False):
        """A request changed [offset, offset + count) through the driver;
        `frees`: it may have unmade plain data there (trim, zero)."""
        if self.running:
            self.log.append((offset, count, frees))

    # --- commands ----------------------------------------------------------

    def start(self, name, nbd, loops, readonly, create=True):
        """Build the table and make it live; start the rounds."""
        with self._lock:
            self.nbd, self.loops, self.readonly = nbd, dict(loops), readonly
            self.device = self.make_device(name)
            if not readonly:
                self.disk.prepare_writes()
            self.log.clear()
            self.running = True
            self.layout = fast.Layout(self.disk)
            want = self._want(self.layout.pieces)
            self.disk.set_pins(Pins(fast.direct(want)))
            tbl = fast.table(want, nbd, self.loops)
            if create:
                dmtable.load(name, tbl, readonly)
            else:
                self.device.load(tbl, readonly)
                self.device.resume()
            self.loaded = want
            self.stats["reloads"] += 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._rounds, daemon=True,
                                        name="dm-manager")
        self._thread.start()
        return self.status()

    def stop(self):
        """No more rounds (the live table stays as it is)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            self.running = False
        return self.status()

    def release(self):
        """Drop every pin: no table of ours will be live again."""
        self.stop()
        self.disk.set_pins(Pins())
        return self.status()

    def status(self):
        targets = len(self.loaded)
        direct = [p for p in self.loaded if p.path]
        return {"targets": targets, "direct-targets": len(direct),
                "direct-bytes": sum(p.length for p in direct) * SECTOR,
                "plain-bytes": self.layout.direct_bytes() if self.layout
                else 0,
                "reloads": self.stats["reloads"],
                "promotions": self.stats["promotions"],
                "aborted": self.stats["aborted"],
                "last-reload-ms": None if self.last_reload is None else
                round(self.last_reload * 1000, 2),
                "errors": self.stats["errors"], "last-error": self.last_error,
                "running": self.running, "pending": len(self.log)}

    def where(self, offset):
        """"direct" or "nbd": what the live table does with that byte."""
        sector = offset // SECTOR
        for p in self.loaded:
            if p.start <= sector < p.end:
                return "direct" if p.path else "nbd"
        return None

    # --- rounds ------------------------------------------------------------

    def _rounds(self):
        behind = False          # a round failed: try again without news
        while not self._stop.wait(INTERVAL):
            if not (self.log or self.overflow or behind):
                continue
            try:
                with self._lock:
                    if self.running:
                        behind = True
                        self.round()
                        behind = False
            except Exception as e:      # keep serving; status says why
                self.stats["errors"] += 1
                self.last_error = str(e)

    def round(self):
        """Read again what requests touched; reload if the table changes
        (caller holds the lock)."""
        notes = self._drain()
        if self.overflow:
            self.overflow = False
            self.layout = fast.Layout(self.disk)
        else:
            self.layout.update(self._dirty(notes))
        want = self._want(self.layout.pieces)
        if want != self.loaded:
            self._reload(want)

    def _reload(self, want):
        began = time.monotonic()
        fresh = fast.newly_direct(self.loaded, want)
        self.disk.set_pins(Pins(fast.direct(self.loaded) +
                                fast.direct(want)))
        self.device.load(fast.table(want, self.nbd, self.loops),
                         self.readonly)
        self.device.suspend()
        try:
            late = self._drain()
            if self.overflow or any(frees and _meets(offset, count, fresh)
                                    for offset, count, frees in late):
                self.device.clear()
                self.stats["aborted"] += 1
                want = self.loaded
            else:
                self._flush_dropped(want)
            self.log.extendleft(reversed(late))     # next round's work
        finally:
            self.device.resume()
        if want is not self.loaded:
            self.stats["reloads"] += 1
            self.stats["promotions"] += len(fresh)
            self.loaded = want
        self.disk.set_pins(Pins(fast.direct(self.loaded)))
        self.last_reload = time.monotonic() - began

    def _drain(self):
        """The notes so far; if too many piled up, none, and the next
        round reads the whole mapping again (overflow)."""
        if len(self.log) > LOG_LIMIT:
            self.log.clear()
            self.overflow = True
            return []
        out = []
        with contextlib.suppress(IndexError):
            for _ in range(len(self.log)):
                out.append(self.log.popleft())
        return out

    def _dirty(self, notes):
        """The noted ranges, widened to whole clusters, sorted, merged."""
        grain = max(self.disk.cluster_size or 0, 64 << 10)
        spans = sorted((o // grain * grain,
                        min(self.disk.size, -(-(o + n) // grain) * grain))
                       for o, n, _ in notes)
        out = []
        for a, b in spans:
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        return [(a, b - a) for a, b in out]

    def _want(self, pieces):
        """The table to have: bounded, and fitted to the loop devices
        (grown first where the file grew)."""
        want = fast.bounded(pieces, self.limit)
        for path in {p.path for p in want if p.path}:
            end = max(p.host + p.length for p in want if p.path == path)
            if self.sizes.get(path, 0) < end * SECTOR:
                self.sizes[path] = _grow(self.loops[path])
        return fast.fit(want, self.sizes)

    def _flush_dropped(self, want):
        """Make durable what went through a device the new table stops
        using (the device is suspended: nothing is in flight)."""
        old = {p.path for p in self.loaded}
        new = {p.path for p in want}
        for path in old - new:
            if path is None:
                self.disk.flush()
            else:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    # --- the control socket --------------------------------------------------

    def listen(self):
        """Bind the control socket now (before nbdkit serves, so it is
        there once the pidfile is); serve it from a thread (serve)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.control)
        os.chmod(self.control, 0o600)
        self._sock.listen(4)

    def serve(self):
        threading.Thread(target=self._accept, daemon=True,
                         name="dm-control").start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return                  # closed
            with conn:
                try:
                    reply = self._command(json.loads(_read_line(conn)))
                except Exception as e:
                    reply = {"error": str(e)}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    def _command(self, req):
        op = req.get("op")
        if op == "start":
            return self.start(req["name"], req["nbd"], req["loops"],
                              req["readonly"], req.get("create", True))
        if op == "where":
            return {"where": self.where(req["offset"])}
        if op in ("status", "stop", "release"):
            return getattr(self, op)()
        raise UsageError(f"unknown request {op!r}")

    def close(self):
        self.stop()
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.control)


def _meets(offset, count, spans):
    a, b = offset // SECTOR, -(-(offset + count) // SECTOR)
    return any(s < b and a < e for s, e in spans)


def _read_line(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _grow(dev):
    """A device's size in bytes; a loop device first takes its file's
    current size (LOOP_SET_CAPACITY)."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.path.basename(os.path.realpath(dev)).startswith("loop"):
            fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
        buf = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
        return struct.unpack("=Q", buf)[0]
    finally:
        os.close(fd)


def request(control, op, timeout=120, **args):
    """Send one request to a manager's control socket; its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(control)
        s.sendall(json.dumps(dict(args, op=op)).encode() + b"\n")
        reply = json.loads(_read_line(s) or b"{}")
    if "error" in reply:
        raise UsageError(reply["error"])
    return reply
