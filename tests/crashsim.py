"""Crash-state simulation for every writable format.

A recording layer sits under a driver's host-file I/O (through
open_image's file_factory) and logs every write, zeroing, truncate and
flush, per file.  A random guest workload runs on the Disk and logs its own
operations in the same log.  From the log we build crash images: at a
crash point, every write followed by a flush of its own file is durable;
writes after their file's last flush may each be lost, land in any order,
or be torn at sector granularity.

Each crash image must then open, check without corruption (leaks are
allowed) and read back every guest write acknowledged before the last
completed guest flush.  Guest writes issued after that flush may show
their old or new contents, sector by sector; a trimmed sector may read as
anything.

    rec = Recorder(image_dir)
    disk = open_image(path, fmt, readonly=False, file_factory=rec.open_file)
    model = run_workload(disk, rec, rng, initial_guest_bytes, ops=300)
    for files, expect in crash_states(rec, rng):
        write_state(files, state_dir)       # then open, check, read
        expect.verify(guest_bytes)          # raises AssertionError
"""

import json
import os
import subprocess

from nbdplug import check_image
from nbdplug.hostfile import HostFile

SECTOR = 512


class Recorder:
    """Snapshot of a directory's files plus a log of what changed them."""

    def __init__(self, directory):
        self.directory = os.path.realpath(directory)
        self.base = {}
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    self.base[name] = f.read()
        self.log = []

    def open_file(self, path, readonly=True, direct=False, create=False):
        return RecordingFile(self, path, readonly=readonly, create=create)

    def name(self, path):
        real = os.path.realpath(path)
        if os.path.dirname(real) != self.directory:
            raise AssertionError(f"{path} is outside {self.directory}")
        return os.path.basename(real)

    def guest(self, *event):
        self.log.append(("guest",) + event)


class RecordingFile(HostFile):
    def __init__(self, rec, path, readonly=True, create=False):
        super().__init__(path, readonly=readonly, create=create)
        self.rec = rec
        self.name = rec.name(path)

    def pwrite(self, buf, offset):
        self.rec.log.append(("write", self.name, offset, bytes(buf)))
        super().pwrite(buf, offset)

    def pwritev(self, bufs, offset):
        data = b"".join(bytes(b) for b in bufs)
        self.rec.log.append(("write", self.name, offset, data))
        super().pwrite(data, offset)

    def pwritev_streaming(self, bufs, offset):
        self.pwritev(bufs, offset)

    def write_zeroes(self, offset, length):
        super().write_zeroes(offset, length)     # logged as writes

    def punch(self, offset, length):
        super().punch(offset, length)
        self.rec.log.append(("zero", self.name, offset, length))

    def zero_range(self, offset, length):
        super().zero_range(offset, length)
        self.rec.log.append(("zero", self.name, offset, length))

    def truncate(self, size):
        self.rec.log.append(("truncate", self.name, size))
        super().truncate(size)

    def flush(self):
        super().flush()
        self.rec.log.append(("flush", self.name))


def _apply(files, op, torn=None):
    """Apply one logged file operation to in-memory files.  `torn` is a
    set of sector indexes of a write to keep (a torn write)."""
    kind, name = op[0], op[1]
    f = files.setdefault(name, bytearray())
    if kind == "truncate":
        size = op[2]
        if size < len(f):
            del f[size:]
        else:
            f.extend(bytes(size - len(f)))
        return
    offset = op[2]
    data = op[3] if kind == "write" else bytes(op[3])
    if len(f) < offset + len(data):
        f.extend(bytes(offset + len(data) - len(f)))
    if torn is None:
        f[offset:offset + len(data)] = data
        return
    for i in torn:
        a, b = i * SECTOR, min((i + 1) * SECTOR, len(data))
        f[offset + a:offset + b] = data[a:b]


class Expectation:
    """What the guest must read from a crash image."""

    def __init__(self, model, later):
        self.model = model          # bytes acknowledged before the flush
        self.later = later          # sector -> list of versions (None: any)

    def verify(self, guest):
        if len(guest) != len(self.model):
            raise AssertionError(f"guest size {len(guest)} != "
                                 f"{len(self.model)}")
        if guest == self.model:
            return
        for s in range(len(self.model) // SECTOR):
            a, b = s * SECTOR, (s + 1) * SECTOR
            got = guest[a:b]
            if got == self.model[a:b]:
                continue
            versions = self.later.get(s, ())
            if any(v is None or v == got for v in versions):
                continue
            raise AssertionError(
                f"sector {s} (offset {a}) holds neither the flushed data "
                f"nor any later write ({len(versions)} candidates)")


def run_workload(disk, rec, rng, initial, ops=300, max_sectors=None,
                 cluster=65536, trim=True, zero=True):
    """Random sector-aligned guest I/O on `disk`, logged in `rec`.

    Mixes partial and whole-cluster writes, overwrites, write-zeroes,
    trims and flushes.  Returns the final expected guest contents.
    """
    model = bytearray(initial)
    size = len(model)
    sectors = size // SECTOR
    max_sectors = max_sectors or 4 * cluster // SECTOR
    hot = [rng.randrange(sectors) for _ in range(8)]   # overwrite targets
    for i in range(ops):
        r = rng.random()
        if r < 0.15:
            start = rng.choice(hot)
        elif r < 0.35:
            start = rng.randrange(size // cluster) * (cluster // SECTOR)
        else:
            start = rng.randrange(sectors)
        if r >= 0.15 and r < 0.35:
            count = cluster // SECTOR * rng.choice((1, 1, 2))
        else:
            count = rng.randint(1, max_sectors)
        count = max(1, min(count, sectors - start))
        offset, length = start * SECTOR, count * SECTOR
        kind = rng.random()
        if kind < 0.08:
            rec.guest("flush")
            disk.flush()
            rec.guest("flush_done")
        elif kind < 0.14 and zero:
            rec.guest("zero", offset, length)
            disk.zero(length, offset, may_trim=rng.random() < 0.5)
            model[offset:offset + length] = bytes(length)
        elif kind < 0.20 and trim:
            rec.guest("trim", offset, length)
            disk.trim(length, offset)
            # After a trim the contents are unspecified: learn what the
            # driver returns so later checks compare against it.
            buf = bytearray(length)
            disk.pread(memoryview(buf), offset)
            model[offset:offset + length] = buf
            rec.guest("trim_reads", offset, bytes(buf))
        else:
            data = rng.randbytes(length)
            rec.guest("write", offset, data)
            disk.pwrite(data, offset, fua=rng.random() < 0.05)
            model[offset:offset + length] = data
    rec.guest("flush")
    disk.flush()
    rec.guest("flush_done")
    return bytes(model)


def _guest_versions(event):
    """(offset, length, data-or-None) that a guest event may leave."""
    kind = event[1]
    if kind == "write":
        return event[2], len(event[3]), event[3]
    if kind == "zero":
        return event[2], event[3], bytes(event[3])
    if kind == "trim":
        return event[2], event[3], None
    return None


def crash_states(rec, rng, initial, variants=4):
    """Yield (files, Expectation) for crash points after every write
    batch: none, all, and `variants` random subsets (some torn, in random
    order) of the writes not yet flushed."""
    log = rec.log
    files = {name: bytearray(data) for name, data in rec.base.items()}
    model = bytearray(initial)
    later = []                  # guest events since the last flush_done
    pending = {}                # file name -> [log index of unflushed op]
    for idx, op in enumerate(log):
        if op[0] == "guest":
            kind = op[1]
            if kind == "flush_done":
                for ev in later:
                    _apply_guest(model, ev)
                later = []
            elif kind == "trim_reads":
                later.append(op)
            elif kind != "flush":
                later.append(op)
            continue
        if op[0] == "flush":
            # Crash just before this flush: its file's writes may be lost.
            yield from _states_at(files, pending, log, rng, model, later,
                                  variants)
            for j in pending.pop(op[1], []):
                _apply(files, log[j])
            continue
        pending.setdefault(op[1], []).append(idx)
    yield from _states_at(files, pending, log, rng, model, later, variants)


def _apply_guest(model, ev):
    if ev[1] == "trim_reads":
        model[ev[2]:ev[2] + len(ev[3])] = ev[3]
        return
    off, length, data = _guest_versions(ev)
    if data is not None:
        model[off:off + length] = data


def _states_at(files, pending, log, rng, model, later, variants):
    ops = sorted(j for js in pending.values() for j in js)
    expect = _expectation(model, later)
    choices = [[], ops] if ops else [[]]
    for _ in range(variants if ops else 0):
        k = rng.randint(0, len(ops))
        subset = rng.sample(ops, k)
        choices.append(subset)
    for n, subset in enumerate(choices):
        state = {name: bytearray(data) for name, data in files.items()}
        order = list(subset) if n < 2 else subset   # sample() is shuffled
        for j in order:
            op = log[j]
            torn = None
            if n >= 2 and op[0] == "write" and rng.random() < 0.2:
                nsec = -(-len(op[3]) // SECTOR)
                torn = set(rng.sample(range(nsec), rng.randint(0, nsec)))
            _apply(state, op, torn)
        yield state, expect


def _expectation(model, later):
    versions = {}
    for ev in later:
        if ev[1] == "trim_reads":
            continue
        off, length, data = _guest_versions(ev)
        for s in range(off // SECTOR, (off + length) // SECTOR):
            a = (s - off // SECTOR) * SECTOR
            versions.setdefault(s, []).append(
                None if data is None else data[a:a + SECTOR])
    return Expectation(bytes(model), versions)


def write_state(files, directory):
    """Materialise a crash state's files in `directory` (replacing)."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def assert_checks_clean(path, fmt, label=None):
    """A crash image checks without corruption (leaks allowed) in
    nbdplug check and in qemu-img check."""
    report = check_image(path, fmt)
    assert report.corruptions == 0, (label, report.messages[:5])
    theirs = subprocess.run(["qemu-img", "check", "--output=json", "-f",
                             fmt, path], capture_output=True, text=True)
    assert theirs.returncode in (0, 3), (label, theirs.stdout, theirs.stderr)
    assert json.loads(theirs.stdout).get("corruptions", 0) == 0, label
