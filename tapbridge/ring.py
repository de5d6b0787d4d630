"""The back end of a blkif shared ring: take requests, put responses.

The ring lives in memory the frontend also writes (granted pages or a
shared file), so:

- every request is copied out of the ring exactly once and only the copy
  is parsed (no double fetch);
- indices are free-running uint32 values, masked only to find a slot;
- a frontend that claims more outstanding requests than the ring holds
  is bogus: the ring halts (RingOverrun) instead of serving garbage;
- the ordering points of ring.h are kept with real fences.  Python has
  no fence of its own, so we call C11 atomic_thread_fence from
  libatomic (a LOCKed instruction on x86): a release fence before
  publishing rsp_prod, an acquire fence after reading req_prod, and a
  full fence between publishing an index and reading the peer's event
  index (the store->load order that x86 does not give for free and
  whose absence loses wakeups).  The dispatcher also re-checks the ring
  periodically, so a missed notification can delay but never stall it.
"""

import ctypes

from .abi import RING_IDX_MASK, SRING_HEADER

_atomic = ctypes.CDLL("libatomic.so.1")
_fence = _atomic.atomic_thread_fence
_fence.argtypes = [ctypes.c_int]
_fence.restype = None
_ACQUIRE, _RELEASE, _SEQ_CST = 2, 3, 5      # C11 memory_order values

# Word indices of the header fields, read and written as aligned uint32.
_REQ_PROD = SRING_HEADER.offset("req_prod") // 4
_REQ_EVENT = SRING_HEADER.offset("req_event") // 4
_RSP_PROD = SRING_HEADER.offset("rsp_prod") // 4
_RSP_EVENT = SRING_HEADER.offset("rsp_event") // 4


class RingOverrun(Exception):
    """The frontend published more requests than the ring can hold."""


class BackRing:
    """Back end of one shared ring in `buf` (the mapped ring pages),
    attached at the ring's current indices as blkback does: the frontend
    initialised it (SHARED_RING_INIT) and may have run its indices
    anywhere; we start consuming at the shared rsp_prod.

    take() and final_check() belong to one consumer thread; respond()
    and push() to whoever holds the caller's response lock.
    """

    def __init__(self, buf, protocol):
        self.protocol = protocol
        self.stride = protocol.stride
        self.size = protocol.ring_size(len(buf))
        self._buf = memoryview(buf)
        # Native uint32 words: x86 is little-endian, as the ABI.
        self._idx = self._buf[:SRING_HEADER.size].cast("I")
        # A response is packed from a zeroed template with three fields
        # set: cheaper than building a named tuple per response.
        layout = protocol.response
        self._pack_response = layout.struct.pack_into
        self._template = list(layout.struct.unpack(bytes(layout.size)))
        self._fields = tuple(layout.fields.index(f)
                             for f in ("id", "operation", "status"))
        start = self._idx[_RSP_PROD]
        self.req_cons = self.rsp_prod_pvt = start
        _fence(_ACQUIRE)
        self._check_prod(self._idx[_REQ_PROD])

    def _slot(self, idx):
        return SRING_HEADER.size + (idx & (self.size - 1)) * self.stride

    def _check_prod(self, prod):
        # RING_REQUEST_PROD_OVERFLOW
        if (prod - self.rsp_prod_pvt) & RING_IDX_MASK > self.size:
            raise RingOverrun(
                f"frontend published req_prod {prod} with responses only "
                f"up to {self.rsp_prod_pvt}: more than the {self.size} "
                "requests the ring holds")

    def take(self):
        """Copies of the requests published since the last take()."""
        prod = self._idx[_REQ_PROD]
        _fence(_ACQUIRE)    # read the entries only after req_prod
        self._check_prod(prod)
        cons = self.req_cons
        # Never consume past a slot whose response is not yet written
        # (RING_REQUEST_CONS_OVERFLOW); the check above bounds it anyway.
        n = min((prod - cons) & RING_IDX_MASK,
                self.size - ((cons - self.rsp_prod_pvt) & RING_IDX_MASK))
        buf, stride, slot = self._buf, self.stride, self._slot
        out = []
        for i in range(n):
            off = slot(cons + i)
            out.append(bytes(buf[off:off + stride]))
        self.req_cons = (cons + n) & RING_IDX_MASK
        return out

    def unconsumed(self):
        """XEN_RING_NR_UNCONSUMED_REQUESTS."""
        req = (self._idx[_REQ_PROD] - self.req_cons) & RING_IDX_MASK
        rsp = self.size - ((self.req_cons - self.rsp_prod_pvt)
                           & RING_IDX_MASK)
        return min(req, rsp)

    def final_check(self):
        """RING_FINAL_CHECK_FOR_REQUESTS: True if requests are waiting;
        otherwise ask for a notification on the next one (req_event)
        and look once more, so one published meanwhile is not missed."""
        if self.unconsumed():
            return True
        self._idx[_REQ_EVENT] = (self.req_cons + 1) & RING_IDX_MASK
        _fence(_SEQ_CST)    # req_event visible before re-reading req_prod
        return self.unconsumed() > 0

    def respond(self, req_id, operation, status):
        """Write one response into the next response slot (unpublished)."""
        values = self._template.copy()
        i, o, s = self._fields
        values[i], values[o], values[s] = req_id, operation, status
        self._pack_response(self._buf, self._slot(self.rsp_prod_pvt),
                            *values)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & RING_IDX_MASK

    def unpublished(self):
        """Responses written since the last push()."""
        return self.rsp_prod_pvt != self._idx[_RSP_PROD]

    def push(self):
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish the responses
        written so far; True if the frontend asked to be notified of one
        of them (its rsp_event lies in (old, new])."""
        old = self._idx[_RSP_PROD]
        new = self.rsp_prod_pvt
        _fence(_RELEASE)    # responses visible before rsp_prod
        self._idx[_RSP_PROD] = new
        _fence(_SEQ_CST)    # rsp_prod visible before reading rsp_event
        event = self._idx[_RSP_EVENT]
        return (new - event) & RING_IDX_MASK < (new - old) & RING_IDX_MASK

    def release(self):
        """Drop our views of the ring memory so it can be unmapped."""
        self._idx.release()
        self._buf.release()
