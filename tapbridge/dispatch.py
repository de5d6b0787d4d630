"""Serving a blkif ring from an nbdplug Disk.

One consumer thread copies requests off the ring, validates each copy
completely, and queues it for a pool of workers; workers call the Disk
(the same driver objects the nbdkit plugin serves) and write the
response, so requests complete out of order as in blkback, QEMU and
tapdisk3.  A full ring of requests in flight is the normal case.

Handing each request to another thread costs more than a 4 KiB request
served from the page cache (a wake-up and GIL hand-offs per request), and
where system calls are dear (a Xen PV dom0, above all under QEMU's TCG)
it costs more than all the rest: there tapbridge ran at 0.7x QEMU's qdisk
with workers and 1.4x to 1.7x without.  So while driver calls do not wait
on storage (their wall time less their CPU time, averaged, is under
SLOW_SECONDS) the consumer serves each batch itself: no other thread is
involved.  Once calls wait, a batch goes to the workers, which can wait
in parallel.  Whoever serves the queue (the consumer or one awake worker)
drains it and publishes the responses when it runs dry (before the last
call as well as after it): one notification per batch.  Every
SLOW_SECONDS while requests are queued the consumer publishes what is
answered and, if they wait behind a driver call that has run that long,
wakes one more worker: a slow or stuck call holds up the others about
that long, and a slow disk soon has every worker busy.  While the
consumer is itself in a call, a watch thread does the same every
WATCH_SECONDS for calls that ran that long (less often when idle), so a
stuck call holds the others up that long at most.  With nothing queued
the consumer sleeps until the frontend notifies it.

- READ / WRITE: the segments become one buffer and one driver call
  (contiguous guest memory is used in place, scattered segments go
  through one bounce buffer).
- FLUSH_DISKCACHE: the write, if any, then Disk.flush(), which makes
  every write completed before it durable.
- WRITE_BARRIER: drain every earlier request, write, flush, and only then
  consume the requests after it.
- DISCARD: trims the part of the range aligned to discard_granularity
  (the image's cluster size, at least 4 KiB); with
  BLKIF_DISCARD_SECURE (advertised only when the disk can zero) the whole
  range is zeroed.  Disks that cannot trim answer EOPNOTSUPP.
- INDIRECT: READ or WRITE with up to MAX_INDIRECT_SEGMENTS segments
  listed in granted pages; the response echoes indirect_op.

A request that fails validation (segment count, first_sect > last_sect,
last_sect > 7, a range past the end, a write to a read-only disk, an
invalid grant) is answered BLKIF_RSP_ERROR before anything is written;
unknown operations are answered BLKIF_RSP_EOPNOTSUPP.
"""

import collections
import errno
import logging
import os
import select
import threading
import time

from . import abi
from .abi import (BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE,
                  BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
                  BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP,
                  BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, PAGE_SIZE, SECTOR_SIZE)
from .ring import BackRing
from .transport import BadGrant

log = logging.getLogger("tapbridge")

# As blkback: 256 segments make a 1 MiB request, listed in one page.
MAX_INDIRECT_SEGMENTS = 256
# Discards are trimmed in whole units of the image's clusters (so a part
# of one is left alone rather than zeroed), advertised to the guest as
# discard-granularity; at least a page, at most MAX_DISCARD_GRANULARITY.
DISCARD_GRANULARITY = PAGE_SIZE
MAX_DISCARD_GRANULARITY = 2 << 20
# The safety net under event suppression: look at the ring this often
# even without a notification.
RECHECK_SECONDS = 0.5
# A driver call running this long waits on storage, not on the CPU:
# another worker may run meanwhile.
SLOW_SECONDS = 0.0002
# The average of driver calls' waits weighs the latest this much.
WAIT_WEIGHT = 1 / 8
# How often the watch thread looks in while requests are out.
WATCH_SECONDS = 0.01
DEFAULT_WORKERS = 4
# A guest can fail requests as fast as it likes; log only the first ones.
MAX_COMPLAINTS = 100

_SEGMENT = abi.BLKIF_REQUEST_SEGMENT.struct
_LAST_SECT = abi.SECTORS_PER_PAGE - 1
_WRITES = (BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE)


def discard_granularity(disk):
    """The disk's cluster size when it is a power of two in range."""
    size = getattr(disk, "cluster_size", None) or DISCARD_GRANULARITY
    if size & (size - 1) or not \
            DISCARD_GRANULARITY <= size <= MAX_DISCARD_GRANULARITY:
        return DISCARD_GRANULARITY
    return size


class Rejected(Exception):
    """A request answered without touching the disk."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


class Request:
    """A validated private copy of one ring request.  `operation` is what
    to do and what the response echoes (an indirect request's inner
    operation)."""

    __slots__ = ("id", "operation", "offset", "length", "segments",
                 "secure")

    def __init__(self, req_id, operation, offset, length, segments=(),
                 secure=False):
        self.id = req_id
        self.operation = operation
        self.offset = offset
        self.length = length
        self.segments = segments
        self.secure = secure


class Dispatcher:
    def __init__(self, disk, transport, protocol, readonly=False,
                 workers=DEFAULT_WORKERS,
                 max_indirect=MAX_INDIRECT_SEGMENTS):
        self.disk = disk
        self.transport = transport
        self.protocol = protocol
        self.ring = BackRing(transport.ring, protocol)
        self.readonly = readonly or disk.readonly
        self.can_discard = disk.can_trim and not self.readonly
        self.can_secure_discard = self.can_discard and disk.can_zero
        self.discard_granularity = discard_granularity(disk)
        self.max_indirect = max_indirect
        self.nworkers = workers
        self.waiting = 0.0      # average time a driver call waited
        self._lock = threading.Lock()   # queue, response slots, counts
        self._idle = threading.Condition(self._lock)    # _inflight == 0
        self._work = threading.Condition(self._lock)    # for workers
        self._queue = collections.deque()
        self._inflight = 0      # dispatched, not yet answered
        self._awake = workers   # workers not waiting for work
        # When each worker's call began; the last one is the consumer's.
        self._calls = [0.0] * (workers + 1)
        self._checked = 0.0     # time of the last _check_workers
        self._quit = False
        self._done = threading.Event()  # for the watch thread
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._complaints = 0

    # --- the consumer -----------------------------------------------------

    def serve(self):
        """Serve until stop(); raises RingOverrun when the frontend
        overruns the ring.  Either way in-flight requests are finished
        and answered and the disk is flushed before this returns."""
        workers = [threading.Thread(target=self._worker, args=(i,),
                                    daemon=True,
                                    name=f"tapbridge-worker-{i}")
                   for i in range(self.nworkers)]
        workers.append(threading.Thread(target=self._watch, daemon=True,
                                        name="tapbridge-watch"))
        for t in workers:
            t.start()
        poller = select.poll()
        poller.register(self.transport.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stopping:
                requests = self.ring.take()
                if requests:
                    batch = []
                    try:
                        for raw in requests:
                            self._dispatch(raw, batch)
                    finally:
                        self._run(batch)
                elif not self.ring.final_check():
                    # Requests queued behind busy workers: look in on them
                    # soon.  Otherwise nothing is owed that a worker will
                    # not publish itself, and polling costs the workers
                    # CPU (a quarter of the throughput under Xen on TCG).
                    wait = SLOW_SECONDS if self._queue else RECHECK_SECONDS
                    if poller.poll(wait * 1000):
                        self.transport.clear_kicks()
                self._check_workers()
        finally:
            self._drain()
            with self._lock:
                self._quit = True
                self._work.notify_all()
            self._done.set()
            for t in workers:
                t.join()
            if not self.disk.readonly:
                self.disk.flush()

    def stop(self):
        """Ask serve() to return (safe from a signal handler)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    def close(self):
        self.ring.release()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _dispatch(self, raw, batch):
        """Answer a bad request, or add a good one to `batch`; a barrier
        first queues the batch and waits for all of it."""
        try:
            req = self._parse(raw)
        except Rejected as e:
            # As blkback: an indirect request's response echoes indirect_op
            # (at offset 1 in both ABIs), even when it is invalid.
            op = raw[1] if raw[0] == BLKIF_OP_INDIRECT else raw[0]
            req_id = self.protocol.request.unpack_from(raw).id
            self._complain("request %#x (operation %d): %s", req_id, op, e)
            self._respond(req_id, op, e.status)
            return
        if req.operation == BLKIF_OP_WRITE_BARRIER:
            # Everything before the barrier completes first; nothing after
            # it is consumed until it is durable.
            self._run(batch)
            batch.clear()
            self._drain()
            self._respond(req.id, req.operation, self._execute(req))
            return
        batch.append(req)

    def _run(self, batch):
        """Queue the batch, and serve it here while calls do not wait;
        else an awake worker takes it (or, if that one is in a slow call,
        _check_workers wakes another)."""
        if not batch:
            return
        with self._lock:
            self._inflight += len(batch)
            self._queue.extend(batch)
            if self.waiting < SLOW_SECONDS:
                self._serve_queue(self.nworkers)
            elif not self._awake:
                self._wake()

    def _watch(self):
        """Look in on the calls while the consumer may be in one."""
        while not self._done.wait(WATCH_SECONDS if self._inflight
                                  else RECHECK_SECONDS):
            if self._inflight:
                with self._lock:
                    self._unstall(time.monotonic(), WATCH_SECONDS)

    def _wake(self):
        """Wake one waiting worker (lock held)."""
        if self._awake < self.nworkers:
            self._awake += 1
            self._work.notify()

    def _check_workers(self):
        """_unstall, at most every SLOW_SECONDS while requests wait."""
        now = time.monotonic()
        if self._queue and now - self._checked >= SLOW_SECONDS:
            self._checked = now
            with self._lock:
                self._unstall(now)

    def _unstall(self, now, slow=SLOW_SECONDS):
        """Publish the responses written so far (the worker that would
        publish them may be in a slow driver call) and, if requests are
        queued behind a call that has run `slow` seconds, wake one more
        worker.  Lock held."""
        if self._queue and any(t and now - t >= slow for t in self._calls):
            self._wake()
        if self.ring.push():
            self.transport.notify()

    def _drain(self):
        with self._idle:
            while self._inflight:
                if not self._idle.wait(SLOW_SECONDS):
                    self._unstall(time.monotonic())

    # --- validation: on the private copy only ------------------------------

    def _parse(self, raw):
        op = raw[0]
        if op == BLKIF_OP_DISCARD:
            return self._parse_discard(raw)
        if op == BLKIF_OP_INDIRECT:
            return self._parse_indirect(raw)
        if op not in (BLKIF_OP_READ, BLKIF_OP_WRITE,
                      BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
            raise Rejected(BLKIF_RSP_EOPNOTSUPP, "unknown operation")
        req = self.protocol.request.unpack_from(raw)
        nseg = req.nr_segments
        least = 1 if op in (BLKIF_OP_READ, BLKIF_OP_WRITE) else 0
        if not least <= nseg <= abi.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise Rejected(BLKIF_RSP_ERROR, f"{nseg} segments")
        segments = [s[:3] for s in
                    _SEGMENT.iter_unpack(req.seg[:nseg * _SEGMENT.size])]
        return self._rw(req.id, op, req.sector_number, segments)

    def _parse_indirect(self, raw):
        req = self.protocol.indirect.unpack_from(raw)
        if not self.max_indirect:
            raise Rejected(BLKIF_RSP_EOPNOTSUPP, "indirect not advertised")
        op, nseg = req.indirect_op, req.nr_segments
        if op not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            raise Rejected(BLKIF_RSP_ERROR, f"indirect operation {op}")
        if not 1 <= nseg <= self.max_indirect:
            raise Rejected(BLKIF_RSP_ERROR, f"{nseg} indirect segments "
                           f"(at most {self.max_indirect})")
        npages = -(-nseg // abi.SEGMENTS_PER_INDIRECT_PAGE)
        grefs = abi.INDIRECT_GREFS.unpack(req.indirect_grefs)[:npages]
        try:
            pages = b"".join(self.transport.page(g) for g in grefs)
        except BadGrant as e:
            raise Rejected(BLKIF_RSP_ERROR, str(e)) from None
        segments = [s[:3] for s in _SEGMENT.iter_unpack(
            pages[:nseg * _SEGMENT.size])]
        return self._rw(req.id, op, req.sector_number, segments)

    def _rw(self, req_id, operation, sector, segments):
        if operation in _WRITES and self.readonly:
            raise Rejected(BLKIF_RSP_ERROR, "write to a read-only disk")
        length = 0
        for _, first, last in segments:
            if not first <= last <= _LAST_SECT:
                raise Rejected(BLKIF_RSP_ERROR,
                               f"segment sectors {first}..{last}")
            length += (last - first + 1) * SECTOR_SIZE
        if not length:
            # A pure flush names no sectors (Linux blkfront sends sector
            # 2**64 - 1): nothing to check, as blkback's xen_vbd_translate.
            return Request(req_id, operation, 0, 0, segments)
        offset = self._range(sector, length)
        return Request(req_id, operation, offset, length, segments)

    def _parse_discard(self, raw):
        req = self.protocol.discard.unpack_from(raw)
        if self.readonly:
            raise Rejected(BLKIF_RSP_ERROR, "discard on a read-only disk")
        if not self.can_discard:
            raise Rejected(BLKIF_RSP_EOPNOTSUPP, "discard not supported")
        length = req.nr_sectors * SECTOR_SIZE
        offset = self._range(req.sector_number, length)
        secure = bool(req.flag & abi.BLKIF_DISCARD_SECURE) and \
            self.can_secure_discard
        return Request(req.id, BLKIF_OP_DISCARD, offset, length,
                       secure=secure)

    def _range(self, sector, length):
        offset = sector * SECTOR_SIZE
        if offset + length > self.disk.size:
            raise Rejected(BLKIF_RSP_ERROR,
                           f"sectors {sector}+{length // SECTOR_SIZE} are "
                           f"past the end ({self.disk.size // SECTOR_SIZE})")
        return offset

    # --- execution ---------------------------------------------------------

    def _worker(self, i):
        with self._lock:
            while True:
                if self._queue:
                    self._serve_queue(i)
                    continue
                if self._quit:
                    return
                self._awake -= 1    # whoever wakes us counts us again
                self._work.wait()

    def _serve_queue(self, i):
        """Run queued requests until there are none, then publish the
        responses; lock held (released around each call).  `i` names
        the caller's slot in _calls."""
        # The time the calls waited (wall less CPU time, the whole batch:
        # the CPU clock costs a system call) goes into the average.
        wall, cpu, calls = time.perf_counter(), time.thread_time(), 0
        while self._queue:
            req = self._queue.popleft()
            if not self._queue and self.ring.unpublished():
                # The last of the batch: what is answered goes out now,
                # not after this call, so that with nothing queued nobody
                # need look in on the calls.
                self._publish()
            self._lock.release()
            try:
                self._calls[i] = time.monotonic()
                status = self._execute(req)
            finally:
                self._calls[i] = 0.0
                self._lock.acquire()
            self.ring.respond(req.id, req.operation, status)
            calls += 1
            self._inflight -= 1
            if not self._inflight:
                self._idle.notify_all()
        self._publish()
        if calls:
            waited = time.perf_counter() - wall - (time.thread_time() - cpu)
            self.waiting += (waited / calls - self.waiting) * WAIT_WEIGHT

    def _publish(self):
        """Push the responses written so far, and notify the frontend if
        it asked; lock held (released around the notification)."""
        if self.ring.push():
            self._lock.release()
            try:
                self.transport.notify()
            finally:
                self._lock.acquire()

    def _execute(self, req):
        """Run one request on the disk; its response status."""
        disk, op = self.disk, req.operation
        try:
            if op == BLKIF_OP_READ:
                buf = self.transport.buffer(req.segments, True)
                disk.pread(buf.view, req.offset)
                buf.finish()
            elif op == BLKIF_OP_DISCARD:
                self._discard(req)
            else:
                if req.segments:
                    buf = self.transport.buffer(req.segments, False)
                    disk.pwrite(buf.view, req.offset)
                if op != BLKIF_OP_WRITE:
                    disk.flush()
            return BLKIF_RSP_OKAY
        except Exception as e:      # the guest gets a status, we a log line
            self._complain("request %#x (operation %d, offset %d, %d bytes):"
                           " %s", req.id, req.operation, req.offset,
                           req.length, e)
            if isinstance(e, OSError) and e.errno == errno.EOPNOTSUPP:
                return BLKIF_RSP_EOPNOTSUPP
            return BLKIF_RSP_ERROR

    def _discard(self, req):
        if req.secure:      # the data must not be readable afterwards
            self.disk.zero(req.length, req.offset, may_trim=True)
            return
        g = self.discard_granularity
        start = -(-req.offset // g) * g
        end = (req.offset + req.length) // g * g
        if end > start:
            self.disk.trim(end - start, start)

    def _complain(self, *args):
        self._complaints += 1
        if self._complaints <= MAX_COMPLAINTS:
            log.warning(*args)
        if self._complaints == MAX_COMPLAINTS:
            log.warning("not logging further failed requests")

    def _respond(self, req_id, operation, status):
        """Answer a request the consumer handled itself, at once."""
        with self._lock:
            self.ring.respond(req_id, operation, status)
            notify = self.ring.push()
        if notify:
            self.transport.notify()
