"""The shared-memory transport: a blkif ring any local process can drive.

    DIR/ring            the ring pages, exactly 4096 << order bytes,
                        initialised by the frontend (SHARED_RING_INIT)
    DIR/grants          guest memory: grant g is bytes [g*4096, (g+1)*4096);
                        a reference beyond the file is an invalid grant
    DIR/kick-backend    FIFO: one byte written notifies the backend
    DIR/kick-frontend   FIFO: one byte written notifies the frontend

The backend creates the FIFOs when absent.  Both files are mapped shared;
the frontend must not shrink them while the backend runs (a page that
vanishes under a mapping would kill the backend with SIGBUS).

With `persistent`, data pages go through grants.PersistentGrants as in
the Xen transport, a "mapping" being a view of the page: what the tests
use to exercise persistent grants without a hypervisor.
"""

import mmap
import os
import stat

from nbdplug.errors import UsageError

from .abi import PAGE_SIZE, SECTOR_SIZE
from .grants import PersistentGrants
from .transport import BadGrant, GuestBuffer

RING, GRANTS = "ring", "grants"
KICK_BACKEND, KICK_FRONTEND = "kick-backend", "kick-frontend"


def make_fifo(path):
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise UsageError(f"{path}: exists and is not a FIFO") from None


class ShmTransport:
    def __init__(self, directory, order, persistent=False):
        self.directory = directory
        self.grants = PersistentGrants(self._map_page, self._unmap_page) \
            if persistent else None
        self.maps = self.unmaps = 0
        self.ring = self._map(RING, PAGE_SIZE << order)
        self._grant_map = self._map(GRANTS, None)
        self._grants = memoryview(self._grant_map or b"")
        self.npages = len(self._grants) // PAGE_SIZE
        for name in (KICK_BACKEND, KICK_FRONTEND):
            make_fifo(os.path.join(directory, name))
        # O_RDWR: opening never waits for the peer, and our reading end
        # sees no EOF when a frontend goes away and comes back.
        flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
        self._kick_in = os.open(os.path.join(directory, KICK_BACKEND), flags)
        self._kick_out = os.open(os.path.join(directory, KICK_FRONTEND),
                                 flags)

    def _map(self, name, expected):
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError(f"{path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if expected is not None and size != expected:
                raise UsageError(f"{path}: {size} bytes, expected {expected} "
                                 "for this ring order")
            return mmap.mmap(fd, size) if size else None
        finally:
            os.close(fd)

    def fileno(self):
        return self._kick_in

    def clear_kicks(self):
        try:
            while os.read(self._kick_in, 4096):
                pass
        except BlockingIOError:
            pass

    def notify(self):
        try:
            os.write(self._kick_out, b"\0")
        except BlockingIOError:
            pass    # FIFO full: the frontend has notifications unread

    def _page_offset(self, gref):
        if gref >= self.npages:
            raise BadGrant(f"grant {gref} is beyond the {self.npages} "
                           "granted pages")
        return gref * PAGE_SIZE

    def _map_page(self, gref):
        off = self._page_offset(gref)
        self.maps += 1
        return self._grants[off:off + PAGE_SIZE], None

    def _unmap_page(self, page, handle):
        page.release()
        self.unmaps += 1

    def page(self, gref):
        if self.grants is not None:
            page = self.grants.page(gref)
            if page is not None:
                return bytes(page)
        off = self._page_offset(gref)
        return bytes(self._grants[off:off + PAGE_SIZE])

    def buffer(self, segments, to_guest):
        if self.grants is not None:
            buf = self.grants.buffer(segments, to_guest)
            if buf is not None:
                return buf
        spans = []      # [offset in grants, length], adjacent ones merged
        for gref, first, last in segments:
            start = self._page_offset(gref) + first * SECTOR_SIZE
            length = (last - first + 1) * SECTOR_SIZE
            if spans and spans[-1][0] + spans[-1][1] == start:
                spans[-1][1] += length
            else:
                spans.append([start, length])
        grants = self._grants
        if len(spans) == 1:     # contiguous guest memory: use it directly
            start, length = spans[0]
            return GuestBuffer(grants[start:start + length])
        view = memoryview(bytearray(sum(n for _, n in spans)))
        if to_guest:
            def deliver(view):
                pos = 0
                for start, length in spans:
                    grants[start:start + length] = view[pos:pos + length]
                    pos += length
            return GuestBuffer(view, deliver)
        pos = 0
        for start, length in spans:
            view[pos:pos + length] = grants[start:start + length]
            pos += length
        return GuestBuffer(view)

    def close(self):
        if self.grants is not None:
            self.grants.close()
        os.close(self._kick_in)
        os.close(self._kick_out)
        self._grants.release()
        for m in (self.ring, self._grant_map):
            if m is not None:
                m.close()
