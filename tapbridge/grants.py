"""Persistent grants (blkif's feature-persistent): a frontend that uses
them grants a fixed pool of pages once and reuses them for every request,
so the backend keeps each one mapped for the life of the ring instead of
mapping, or copying through the hypervisor, per request.

- Keyed by grant reference; mapped writable on first use (the frontend
  reuses a page for reads and writes; Linux blkfront grants them so).
- Bounded as blkback bounds them: at most MAX_GRANTS per ring.  Past the
  bound, or for a grant that will not map writable, the request falls
  back to the transport's per-request path; nothing is evicted, so a
  page in use is never unmapped under a request.
- Every mapping is undone on close(), which the transport calls when the
  ring goes: until then the frontend cannot take the pages back (and a
  destroyed guest's memory stays allocated).

A request of several segments is staged through one local buffer (the
driver takes one buffer per call): segments gathered from the mapped
pages for a write, scattered to them after a read.
"""

import gc
import logging
import threading

from .abi import SECTOR_SIZE, SECTORS_PER_PAGE
from .transport import BadGrant, GuestBuffer

log = logging.getLogger("tapbridge")

# blkback's xen_blkif_max_pgrants: a 32-entry ring of Linux blkfront's
# 32-segment indirect requests (1024 pages) and their indirect pages.
MAX_GRANTS = 1056


class PersistentGrants:
    """Grant reference -> a mapped page, via `map_page(gref)`, which
    returns (page, handle) with `page` a writable buffer of one page, or
    raises BadGrant; `unmap_page(page, handle)` undoes it."""

    def __init__(self, map_page, unmap_page, limit=MAX_GRANTS):
        self._map_page = map_page
        self._unmap_page = unmap_page
        self.limit = limit
        self._pages = {}        # gref -> (memoryview, page, handle)
        self._refused = set()   # grefs that would not map: copy those
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._pages)

    def page(self, gref):
        """A view of the mapped page, or None: use the other path."""
        entry = self._pages.get(gref)
        if entry is not None:
            return entry[0]
        return self._map(gref)

    def _map(self, gref):
        with self._lock:
            entry = self._pages.get(gref)
            if entry is not None:
                return entry[0]
            # Refused grants are remembered only up to the same bound, so
            # a guest cannot grow this set without limit either.
            if len(self._pages) >= self.limit or gref in self._refused:
                return None
            try:
                page, handle = self._map_page(gref)
            except BadGrant:
                if len(self._refused) < self.limit:
                    self._refused.add(gref)
                return None
            view = memoryview(page).cast("B")
            self._pages[gref] = (view, page, handle)
            return view

    def buffer(self, segments, to_guest):
        """The request's data as a GuestBuffer, or None when a segment's
        grant is not (and cannot be) mapped persistently.  One segment is
        the mapped page itself: the driver reads or writes guest memory
        directly, as blkback does with persistent grants (a read that
        fails leaves the guest's own page undefined, nothing else)."""
        pages = self._pages
        spans = []
        total = 0
        for gref, first, last in segments:
            entry = pages.get(gref)
            page = entry[0] if entry is not None else self._map(gref)
            if page is None:
                return None
            if first or last != SECTORS_PER_PAGE - 1:
                page = page[first * SECTOR_SIZE:(last + 1) * SECTOR_SIZE]
            spans.append(page)
            total += len(page)
        if len(spans) == 1:
            return GuestBuffer(spans[0])
        view = memoryview(bytearray(total))
        if to_guest:
            def deliver(view):
                pos = 0
                for span in spans:
                    end = pos + len(span)
                    span[:] = view[pos:end]
                    pos = end
            return GuestBuffer(view, deliver)
        pos = 0
        for span in spans:
            end = pos + len(span)
            view[pos:end] = span
            pos = end
        return GuestBuffer(view)

    def close(self):
        """Unmap every page (no request may be using one)."""
        with self._lock:
            pages, self._pages = self._pages, {}
        gc.collect()    # spans of finished requests still in cycles
        for gref, (view, page, handle) in pages.items():
            view.release()
            try:
                self._unmap_page(page, handle)
            except BufferError:     # a view of it outlived its request
                log.error("grant %d still in use; left mapped", gref)
