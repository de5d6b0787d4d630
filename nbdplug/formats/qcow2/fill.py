"""A moving disk: copy-on-read from the source and the background fill
(`nbdplug migrate`; the record that allows it is in migration.py).

While a qcow2 image's verified record says the move is on, a read of a
cluster the image does not hold fetches the whole cluster from the source
and stores it before answering, and a thread copies the clusters that the
source's allocation map says hold data, in order, at the recorded rate.
When every one is local, one write to the header's first sector drops
the backing name and the disk has no tie to the source any more.

Rules that keep it correct, whoever drives the disk:

* A cluster is missing while its L2 entry is empty (it reads from the
  source).  A guest write, zero or trim makes the entry non-empty (with a
  backing file, version 3 records a discard as a zero cluster), and a
  missing cluster is stored only after checking, under the lock and with
  the cluster claimed as writes claim it (busy), that it is still
  missing: what was fetched before a newer guest write is dropped.
* A guest write to part of a missing cluster is the driver's ordinary
  allocating write, which reads the rest of the cluster from the source.
* Stores are the driver's allocating writes in two halves: host
  clusters and data (staged), then, after a flush, the L2 entries
  (committed).  So a crash never leaves a cluster allocated with partial
  data (at worst a leak), and a resumed fill fetches only what is still
  missing.  A staged cluster stays claimed and busy until committed.
  The fill commits many stores with one flush; a read's own store
  commits at once.  A fetched cluster of zeros becomes a zero cluster,
  with no data.
* Ranges the source maps as holes or zeros are never fetched by the fill.
* Each cluster is fetched by one thread at a time (`fetching`); another
  that needs it waits for that fetch.
"""

import contextlib
import errno
import json
import os
import queue
import sys
import threading
import time

from nbdplug.errors import ImageError
from nbdplug.formats import nbd
from . import migration, structs as S

FILL_REQUEST = 4 << 20          # bytes a fetcher reads in one go
FILL_WORKERS = 2                # fetchers, each with its own connection
FILL_COMMIT = 32 << 20          # bytes the fill writes between flushes,
FILL_COMMIT_AGE = 0.05          # or seconds (a reader of a cluster written
                                # and not yet committed waits for it)
FILL_SWITCH_INTERVAL = 0.0002   # seconds (see _GilTurns)
FILL_PATIENCE = 2.0             # seconds a fill request waits, then pauses
FILL_LIMIT = 30.0               # seconds one may take (a source that went
                                # silent); FILL_REQUEST at 140 KB/s
MAX_PAUSE = 5.0                 # longest pause between tries
STATUS_INTERVAL = 0.5           # seconds between status updates (besides
                                # one after each copy-on-read)


def status_path(image):
    """Where the process filling `image` says how it goes (JSON)."""
    return image + ".migration"


def read_status(image):
    try:
        with open(status_path(image)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Move:
    """The move of `disk` (a Qcow2Disk opened writable) from its backing
    file, under `record`; `fill` False leaves the fill to whoever calls
    start() (or to nobody)."""

    def __init__(self, disk, record, fill=True):
        self.disk = disk
        self.record = record
        self.active = record.active
        self.autostart = fill and self.active
        self.fetching = {}      # guest cluster -> Event (disk.lock)
        self.stop = threading.Event()
        self.thread = None
        self.pid = None
        self.fill_sources = []
        self.fill_lock = threading.Lock()
        self.staged = []        # fetched, written, not yet committed
        self.staged_bytes = 0
        self.staged_since = 0.0
        self.report_lock = threading.Lock()
        self.plan = None        # [(first, last)] clusters the source holds
        self.batch = max(1, FILL_REQUEST >> disk.cluster_bits)  # clusters
        self.total = self.done = 0
        self.state = "filling" if self.active else "cancelled"
        self.paused_since = None
        self.error = None
        self.finished = threading.Event()
        self.last_status = 0.0
        self.rate_mark = (time.monotonic(), 0)     # for the speed
        self.due = 0.0          # when the bytes fetched so far are due
        self.speed = 0.0
        old = read_status(disk.path) or {}
        self.source = disk.backing         # kept for its counts
        self.source_name = disk.backing_name
        self.fetched_before = old.get("fetched", 0) \
            if old.get("source") == self.source_name else 0
        # A read's fetch is counted in the status at once, so a kill -9
        # loses no count of it; the fill's are, every STATUS_INTERVAL.
        if isinstance(self.source, nbd.Reconnecting):
            self.source.on_read = self._fetched

    # --- the request path -------------------------------------------------

    def kick(self):
        """Start the fill on the first request (not at open: nbdkit forks
        after opening, and threads do not survive a fork)."""
        if self.autostart and (self.thread is None or
                               self.pid != os.getpid()):
            self.start()

    def before_read(self, offset, length):
        """Make the clusters of a read local, fetching those missing."""
        self.kick()
        if not self.active or self.disk.readonly:
            return
        cb = self.disk.cluster_bits
        first, last = offset >> cb, (offset + length - 1) >> cb
        # One bound for the whole request: waiting for another thread's
        # fetch of these clusters, then fetching what is still missing.
        patience = getattr(self.source, "patience", None)
        deadline = None if patience is None else \
            time.monotonic() + patience
        claimed = self._claim(first, last - first + 1, wait=True,
                              deadline=deadline)
        try:
            self._copy(self.source, claimed, deadline)
        except ImageError:
            # A move that completed meanwhile closed the source: what is
            # still missing then is what the source holds as zeros.
            if self.active:
                raise
        finally:
            self._release(claimed)

    def _claim(self, first, n, wait, deadline=None):
        """Runs (c0, count) of the missing clusters in [first, first+n),
        now ours to fetch.  With `wait`, clusters another thread is
        fetching are waited for (until `deadline`, then EIO); without,
        they are skipped."""
        d = self.disk
        while True:
            with d.lock:
                missing = [c for c in range(first, first + n)
                           if c not in self.fetching and
                           d.map_.entry(c) == (0, 0)]
                busy = [self.fetching[c] for c in range(first, first + n)
                        if c in self.fetching]
                if not wait or not busy:
                    event = threading.Event()
                    for c in missing:
                        self.fetching[c] = event
                    return _runs(missing)
            for event in busy:
                left = None if deadline is None else \
                    deadline - time.monotonic()
                if not event.wait(left if left is None else max(left, 0)):
                    err = ImageError(d.path, "qcow2", "source unreachable: "
                                     "another fetch of these clusters has "
                                     "not ended")
                    err.errno = errno.EIO
                    raise err

    def _release(self, claimed):
        events = set()
        with self.disk.lock:
            for c0, n in claimed:
                for c in range(c0, c0 + n):
                    events.add(self.fetching.pop(c))
        for event in events:
            event.set()

    def _copy(self, source, runs, deadline=None):
        """Fetch the clusters of `runs` [(c0, n)] from `source` (a remote
        one giving up at `deadline`, or at the end of its patience) and
        store them, with one flush."""
        self.store(self._fetch(source, runs, deadline))

    def _fetch(self, source, runs, deadline=None, into=None):
        """[(c0, view)] of whole clusters for `runs`, read from `source`
        into `into` (a fill worker's buffer) or new memory."""
        d = self.disk
        cs = d.cluster_size
        if into is None:
            into = memoryview(bytearray(sum(n for _, n in runs) * cs))
        pieces = []
        pos = 0
        for c0, n in runs:
            view = into[pos:pos + n * cs]
            pos += n * cs
            length = min(n * cs, d.size - c0 * cs)
            if deadline is None:
                source.pread(view[:length], c0 * cs)
            else:
                source.pread(view[:length], c0 * cs, deadline=deadline)
            view[length:] = bytes(n * cs - length)  # the disk ends in it
            pieces.append((c0, view))
        return pieces

    def store(self, pieces):
        """Store whole clusters, [(first cluster, their bytes)], each only
        if still missing (a guest write since the fetch is newer: it
        wins)."""
        staged = self._stage(pieces)
        if staged is not None:
            self._commit([staged])

    def _stage(self, pieces, claims=(), streaming=False):
        """The first half of store(): the clusters still missing get host
        clusters and their data is written, not yet flushed; they stay
        busy (a guest write waits) until _commit() points at them.
        Takes the fetch `claims` (a reader waits until then too).
        Returns what _commit() takes, or None if nothing was left to
        write.  `streaming`: the fill's data (HostFile.pwritev_streaming)."""
        d = self.disk
        cs = d.cluster_size
        zero = bytes(cs)
        staged = _Staged(list(claims))
        try:
            clusters = [(c0 + i, memoryview(buf)[i * cs:(i + 1) * cs])
                        for c0, buf in pieces for i in range(len(buf) // cs)]
            with d.lock:
                if d.readonly:
                    clusters = []
                else:
                    d._prepare()
                while any(c in d.busy for c, _ in clusters):
                    d.cond.wait()
                items = []
                for c, piece in clusters:
                    if d.map_.entry(c) != (0, 0):
                        continue
                    # (Its first bytes settle most clusters without a
                    # full compare, which would hold the GIL.)
                    if piece[:16] == zero[:16] and piece == zero:
                        d._ensure_l2(c)
                        d.map_.set_entry(c, S.QCOW_OFLAG_ZERO)
                    else:
                        items.append((c, 0, piece))
                if items:
                    staged.busy = [c for c, _, _ in items]
                    d.busy.update(staged.busy)
                    staged.token = d._io_start()
            if not items:
                self._release(staged.claims)
                return None
            staged.placed = d._place(items, streaming)
        except BaseException:
            self._unstage([staged])
            raise
        return staged

    def _commit(self, staged):
        """Flush, then point the L2 entries at what was staged: one flush
        for all of it.  Clusters whose commit failed stay missing (their
        host clusters leak; a reader fetches them again)."""
        d = self.disk
        try:
            if not d.readonly:
                d.file.flush()
                for s in staged:
                    d._point(s.placed)
        finally:
            self._unstage(staged)

    def _unstage(self, staged):
        d = self.disk
        with d.lock:
            for s in staged:
                if s.token is not None:
                    del d.inflight[s.token]
                    s.token = None
                d.busy.difference_update(s.busy)
            d.cond.notify_all()
        self._release([run for s in staged for run in s.claims])

    # --- the fill -----------------------------------------------------------

    def start(self, background=True):
        """Run the fill in a thread; `background`: beside requests (see
        _GilTurns)."""
        self.background = background
        self.started = time.monotonic()
        self.pid = os.getpid()
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="nbdplug-fill")
        self.thread.start()

    def wait(self, timeout=None):
        """True once the move is complete."""
        return self.finished.wait(timeout)

    def _run(self):
        d = self.disk
        if isinstance(d.backing, nbd.Reconnecting):
            # Connections of their own, so a request's fetch never
            # queues behind a fill request, and the workers' fetches
            # overlap each other's stores.
            self.fill_sources = [nbd.Reconnecting(
                d.backing.path, d.size, FILL_PATIENCE, self.stop,
                FILL_LIMIT) for _ in range(FILL_WORKERS)]
        else:
            self.fill_sources = [d.backing] * FILL_WORKERS
        self.pause = 0.1
        with _GilTurns() if self.background else \
                contextlib.nullcontext():
            self._passes()
        self._report(force=True)

    def _passes(self):
        """Fill passes until the move is complete, stopped, or cannot go
        on; a pass that fails for want of the source is tried again."""
        d = self.disk
        while not self.stop.is_set():
            if d.readonly:              # stopped writing: corrupt metadata
                self.state, self.error = "stopped", d.stopped
                break
            try:
                if self.plan is None:
                    self.plan = _plan(self.fill_sources[0].map(d.size, 0),
                                      d.cluster_bits)
                    self.total = sum(min(last + 1 << d.cluster_bits, d.size)
                                     - (first << d.cluster_bits)
                                     for first, last in self.plan)
                    self._report(force=True)
                self._fill()
                if self.stop.is_set() or self._finish():
                    break
                self.stop.wait(0.05)    # clusters another thread fetches
            except ImageError as e:
                # The source is away (or refused): pause, then go on.
                self.state, self.error = "paused", str(e)
                self.paused_since = self.paused_since or time.time()
                self._report(force=True)
                self.stop.wait(self.pause)
                self.pause = min(self.pause * 2, MAX_PAUSE)
            except Exception as e:      # a full disk, a bug: say so, stop
                self.state, self.error = "stopped", str(e)
                break

    def _batches(self):
        """The plan's clusters in map order, as fill requests: [(first
        cluster, count)] runs of FILL_REQUEST bytes at most, together."""
        most = self.batch
        batch, size = [], 0
        for first, last in self.plan:
            c = first
            while c <= last:
                n = min(most - size, last + 1 - c)
                batch.append((c, n))
                size += n
                c += n
                if size == most:
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch

    def _fill(self):
        """One pass over the plan.  Fetchers, each with a connection of
        its own, read the missing clusters of a batch at a time into
        buffers of a pool; this thread stores what they read, and
        commits every FILL_COMMIT bytes, or FILL_COMMIT_AGE seconds, or
        at once under a rate limit (so that no reader waits out the
        filler's pause).  Fetching never waits for the disk, nor storing
        for the source."""
        d = self.disk
        cb = d.cluster_bits
        batches = self._batches()
        errors = []
        self.passed = 0
        free, ready = queue.Queue(), queue.Queue()
        for _ in range(2 * len(self.fill_sources)):
            free.put(memoryview(bytearray(self.batch << cb)))

        def fetcher(source):
            try:
                while not self.stop.is_set() and not errors:
                    with self.fill_lock:
                        batch = next(batches, None)
                    if batch is None:
                        return
                    planned = sum(n for _, n in batch) << cb
                    self._throttle(planned)
                    buf = free.get()
                    claimed = []
                    try:
                        for c, n in batch:
                            claimed += self._claim(c, n, wait=False)
                        pieces = self._fetch(source, claimed, into=buf)
                    except BaseException:
                        self._release(claimed)
                        free.put(buf)
                        raise
                    ready.put((batch, claimed, pieces, buf))
                    # What was local already costs nothing.
                    self._throttle((sum(n for _, n in claimed) << cb) -
                                   planned)
            except BaseException as e:
                errors.append(e)
            finally:
                ready.put(None)

        threads = [threading.Thread(target=fetcher, args=(source,),
                                    name="nbdplug-fill")
                   for source in self.fill_sources]
        for t in threads:
            t.start()
        running = len(threads)
        while running:
            try:
                item = ready.get(timeout=FILL_COMMIT_AGE)
            except queue.Empty:         # a slow source: nothing waits
                self._commit_staged()
                continue
            if item is None:
                running -= 1
                continue
            batch, claimed, pieces, buf = item
            try:
                if errors or self.stop.is_set():
                    self._release(claimed)
                else:
                    self._store_batch(batch, claimed, pieces)
            except BaseException as e:
                errors.append(e)
            finally:
                free.put(buf)
        for t in threads:
            t.join()
        self._commit_staged()
        if errors:
            raise errors[0]

    def _store_batch(self, batch, claimed, pieces):
        """Stage what a fetcher read of `batch` (taking its claims), and
        commit if enough is staged."""
        d = self.disk
        cb = d.cluster_bits
        staged = self._stage(pieces, claimed, streaming=True)
        with self.fill_lock:
            if staged is not None:
                if not self.staged:
                    self.staged_since = time.monotonic()
                self.staged.append(staged)
                self.staged_bytes += len(staged.busy) << cb
            if self.state == "paused":
                self.state, self.paused_since = "filling", None
                self.error, self.pause = None, 0.1
            self.passed += sum(min(c + n << cb, d.size) - (c << cb)
                               for c, n in batch)
            self.done = max(self.done, self.passed)
            due = self.staged and (
                self.staged_bytes >= FILL_COMMIT or self.record.rate or
                time.monotonic() - self.staged_since >= FILL_COMMIT_AGE)
        if due:
            self._commit_staged()
        self._report()

    def _commit_staged(self):
        with self.fill_lock:
            staged, self.staged, self.staged_bytes = self.staged, [], 0
        if staged:
            self._commit(staged)

    def _throttle(self, nbytes):
        """Count `nbytes` against the rate (negative: a refund of bytes
        counted too many) and wait until they are due: called before a
        fetch, so that nothing is claimed while it waits."""
        with self.fill_lock:
            now = time.monotonic()
            start, sent = self.rate_mark
            sent += nbytes
            if now - start >= 1.0:
                self.speed = sent / (now - start)
                start, sent = now, 0
            self.rate_mark = (start, sent)
            rate = self.record.rate
            ahead = 0
            if rate:
                self.due = max(self.due, now) + nbytes / rate
                ahead = self.due - now
        if ahead > 0:
            self.stop.wait(ahead)

    def _finish(self):
        """If every cluster the source holds is local, drop the source:
        flush, then one header write without the backing name, then wait
        for reads that may still be reading from it.  Returns whether the
        move is complete."""
        d = self.disk
        for first, last in self.plan:
            for c in range(first, last + 1, 4096):
                with d.lock:
                    if any(d.map_.entry(x) == (0, 0)
                           for x in range(c, min(c + 4096, last + 1))):
                        return False
        d.flush()
        with d.lock:
            migration.finish(d.file)
            source = d.backing
            mark = d.seq
        # Reads planned before the switch may still read from the source.
        while True:
            with d.lock:
                oldest = next(iter(d.inflight), None)
                if oldest is None or oldest > mark:
                    d.backing = None
                    d.backing_name = d.backing_format = None
                    self.active = False
                    break
            time.sleep(0.001)
        self.state = "done"
        self.done = self.total
        took = time.monotonic() - self.started
        filled = sum(s.fetched for s in self.fill_sources
                     if s is not self.source)
        if filled and took > 0:
            self.speed = filled / took
        self._report(force=True)
        if source is not None:
            source.close()
        self.finished.set()
        return True

    # --- status ---------------------------------------------------------------

    def fetched(self):
        n = self.fetched_before
        for source in {id(s): s for s in [self.source] +
                       self.fill_sources}.values():
            n += getattr(source, "fetched", 0)
        return n

    def status(self):
        source = (self.fill_sources or [self.source])[0]
        eta = None
        if self.speed and self.state == "filling":
            eta = (self.total - self.done) / self.speed
        return {"pid": os.getpid(), "state": self.state,
                "source": self.source_name, "done": self.done,
                "total": self.total, "rate": round(self.speed),
                "limit": self.record.rate, "eta": eta,
                "fetched": self.fetched(),
                "source_reachable": getattr(source, "reachable", None),
                "paused_since": self.paused_since, "error": self.error,
                "updated": time.time()}

    def _fetched(self):
        if self.active and not self.disk.readonly:
            self._report(force=True)

    def _report(self, force=False):
        now = time.monotonic()
        if not force and now - self.last_status < STATUS_INTERVAL:
            return
        with self.report_lock:
            self.last_status = now
            path = status_path(self.disk.path)
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(self.status(), f)
                os.replace(tmp, path)
            except OSError:
                pass            # the status is a courtesy, the fill is not

    def close(self):
        self.stop.set()
        if self.thread is not None and self.pid == os.getpid() and \
                self.thread is not threading.current_thread():
            self.thread.join()
        for source in self.fill_sources:
            if source is not self.source:
                source.close()
        if self.thread is not None and self.state != "done":
            if self.state == "filling":
                self.state = "stopped"
            self._report(force=True)


class _Staged:
    """Clusters a store wrote and has not yet pointed at: the fetch
    claims it holds, the guest clusters it keeps busy, its I/O token and
    what Qcow2Disk._place() returned."""

    def __init__(self, claims):
        self.claims = claims
        self.busy, self.token, self.placed = [], None, None


class _GilTurns:
    """While a fill runs beside requests, Python switches threads every
    FILL_SWITCH_INTERVAL seconds instead of 5 ms, so that a request that
    needs the GIL while fill threads run Python waits that long at most.
    Measured with bench/migrate_bench.py's latency part (4 KiB reads of
    local clusters during a full-speed fill, against the same once the
    move is done): 1.28x idle so; the fill threads under SCHED_IDLE made
    it 2.7x and at nice 19 1.6x, as a thread that holds the GIL then
    waits for a CPU while the request waits for it."""

    lock = threading.Lock()
    fills = 0
    before = None

    def __enter__(self):
        with self.lock:
            if not _GilTurns.fills:
                _GilTurns.before = sys.getswitchinterval()
                sys.setswitchinterval(FILL_SWITCH_INTERVAL)
            _GilTurns.fills += 1

    def __exit__(self, *exc):
        with self.lock:
            _GilTurns.fills -= 1
            if not _GilTurns.fills:
                sys.setswitchinterval(_GilTurns.before)


def _plan(runs, cluster_bits):
    """[(first, last)] guest clusters holding data in the source's map
    (its holes and zero ranges are left out), merged."""
    out = []
    for run in runs:
        if not run.data or run.zero:
            continue
        first = run.offset >> cluster_bits
        last = (run.offset + run.length - 1) >> cluster_bits
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def _runs(clusters):
    """Sorted cluster numbers as [(first, count)] runs."""
    out = []
    for c in clusters:
        if out and out[-1][0] + out[-1][1] == c:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out
