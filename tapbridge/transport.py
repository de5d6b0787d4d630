"""What the dispatcher needs from a ring transport (shm.py, xen.py).

A transport offers:

- `ring`: the mapped ring pages (a writable buffer);
- `fileno()`: readable when the frontend has notified us; then
  `clear_kicks()` consumes the notifications (and re-arms them);
- `notify()`: notify the frontend;
- `page(gref)`: a private copy of one granted page (an indirect request's
  segment list is read once, then parsed from the copy);
- `buffer(segments, to_guest)`: the bytes of a request's segments, each
  (gref, first_sect, last_sect), as one GuestBuffer, so that one driver
  call serves the whole request.  Every grant is checked first and
  BadGrant raised before anything touches the disk;
- `close()`.
"""


class BadGrant(Exception):
    """A grant reference the frontend may not use (or that failed)."""


class GuestBuffer:
    """A request's data as one buffer.  `view` is read by a write and
    filled by a read; `finish()` then delivers a read's bytes to the guest
    (nothing to do when `view` is guest memory itself)."""

    __slots__ = ("view", "_deliver")

    def __init__(self, view, deliver=None):
        self.view = view
        self._deliver = deliver

    def finish(self):
        if self._deliver is not None:
            self._deliver(self.view)
