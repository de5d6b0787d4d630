"""The Xen transport: a guest's ring and data through /dev/xen/gntdev and
/dev/xen/evtchn, with ioctl and mmap (the interface of shm.py).

- The ring pages are grant-mapped, contiguously in ring-ref order.
- Data moves by grant copy, as tapdisk3 and QEMU do: a write's segments
  are copied from the guest before the driver call, a read's are copied
  to the guest only after it succeeded.
- With persistent grants (both ends offered feature-persistent) each
  data page is instead mapped once, on first use, and kept mapped for
  the life of the ring (grants.py); past grants.MAX_GRANTS, requests
  take the grant-copy path.
- Events: bind the frontend's port (the ioctl returns our local port);
  the kernel masks a port when it fires, so clear_kicks() reads the
  pending ports and writes each back to unmask it before the ring is
  drained, and a notification arriving meanwhile stays pending.
"""

import ctypes
import fcntl
import mmap
import os
import struct

from .abi import (EVTCHN_BIND_INTERDOMAIN, EVTCHN_PORT, GNTCOPY_dest_gref,
                  GNTCOPY_source_gref, GNTDEV_GRANT_COPY,
                  GNTDEV_GRANT_COPY_FOREIGN, GNTDEV_GRANT_COPY_SEGMENT,
                  GNTDEV_GRANT_REF, GNTDEV_MAP_GRANT_REF,
                  GNTDEV_UNMAP_GRANT_REF, GNTST_okay,
                  IOCTL_EVTCHN_BIND_INTERDOMAIN, IOCTL_EVTCHN_NOTIFY,
                  IOCTL_EVTCHN_UNBIND, IOCTL_GNTDEV_GRANT_COPY,
                  IOCTL_GNTDEV_MAP_GRANT_REF, IOCTL_GNTDEV_UNMAP_GRANT_REF,
                  PAGE_SIZE, SECTOR_SIZE)
from .grants import PersistentGrants
from .transport import BadGrant, GuestBuffer

GNTDEV = "/dev/xen/gntdev"
EVTCHN = "/dev/xen/evtchn"
_PORTS = struct.Struct("<I")


# --- request encoding ---------------------------------------------------

def map_grant_ref_request(domid, refs):
    """IOCTL_GNTDEV_MAP_GRANT_REF's argument; `index` comes back in it."""
    buf = bytearray(GNTDEV_MAP_GRANT_REF.pack(count=len(refs), pad=0,
                                              index=0))
    for ref in refs:
        buf += GNTDEV_GRANT_REF.pack(domid=domid, ref=ref)
    return buf


def unmap_grant_ref_request(index, count):
    return bytearray(GNTDEV_UNMAP_GRANT_REF.pack(index=index, count=count,
                                                 pad=0))


def copy_segment(local_address, domid, gref, offset, length, to_guest):
    """One ioctl_gntdev_grant_copy_segment between local memory and a
    granted page: to the guest for reads, from it for writes."""
    local = struct.pack("<Q", local_address)
    foreign = GNTDEV_GRANT_COPY_FOREIGN.pack(ref=gref, offset=offset,
                                             domid=domid)
    return GNTDEV_GRANT_COPY_SEGMENT.pack(
        source=local if to_guest else foreign,
        dest=foreign if to_guest else local, len=length,
        flags=GNTCOPY_dest_gref if to_guest else GNTCOPY_source_gref,
        status=0, pad1=b"")


def grant_copy_request(segments_address, count):
    return bytearray(GNTDEV_GRANT_COPY.pack(count=count, pad1=b"",
                                            segments=segments_address))


def bind_interdomain_request(domid, remote_port):
    return bytearray(EVTCHN_BIND_INTERDOMAIN.pack(remote_domain=domid,
                                                  remote_port=remote_port))


def port_request(port):
    return bytearray(EVTCHN_PORT.pack(port=port))


# --- the transport -----------------------------------------------------------

class XenTransport:
    def __init__(self, domid, refs, order, remote_port, persistent=False):
        if len(refs) != 1 << order:
            raise ValueError(f"{len(refs)} ring refs for order {order}")
        self.domid = domid
        self._gntdev = os.open(GNTDEV, os.O_RDWR | os.O_CLOEXEC)
        self._evtchn = None
        self.ring = None
        self.grants = PersistentGrants(self._map_page, self._unmap_page) \
            if persistent else None
        try:
            req = map_grant_ref_request(domid, refs)
            fcntl.ioctl(self._gntdev, IOCTL_GNTDEV_MAP_GRANT_REF, req)
            self._ring_index = GNTDEV_MAP_GRANT_REF.unpack_from(req).index
            self._ring_pages = len(refs)
            self.ring = mmap.mmap(self._gntdev, len(refs) * PAGE_SIZE,
                                  offset=self._ring_index)
            self._evtchn = os.open(EVTCHN, os.O_RDWR | os.O_NONBLOCK |
                                   os.O_CLOEXEC)
            self.port = fcntl.ioctl(self._evtchn,
                                    IOCTL_EVTCHN_BIND_INTERDOMAIN,
                                    bind_interdomain_request(domid,
                                                             remote_port))
        except BaseException:
            self.close()
            raise

    def fileno(self):
        return self._evtchn

    def clear_kicks(self):
        try:
            pending = os.read(self._evtchn, PAGE_SIZE)
        except BlockingIOError:
            return
        for (port,) in _PORTS.iter_unpack(pending[:len(pending) // 4 * 4]):
            os.write(self._evtchn, _PORTS.pack(port))    # unmask

    def notify(self):
        fcntl.ioctl(self._evtchn, IOCTL_EVTCHN_NOTIFY, port_request(self.port))

    def _copy(self, local, spans, to_guest):
        """Grant-copy between `local` (a ctypes buffer) and the guest
        `spans` of (gref, offset, length); BadGrant on any failure."""
        base = ctypes.addressof(local)
        segs = bytearray()
        pos = 0
        for gref, offset, length in spans:
            segs += copy_segment(base + pos, self.domid, gref, offset,
                                 length, to_guest)
            pos += length
        array = (ctypes.c_char * len(segs)).from_buffer(segs)
        fcntl.ioctl(self._gntdev, IOCTL_GNTDEV_GRANT_COPY,
                    grant_copy_request(ctypes.addressof(array), len(spans)))
        status_at = GNTDEV_GRANT_COPY_SEGMENT.offset("status")
        for i, (gref, _, _) in enumerate(spans):
            (status,) = struct.unpack_from(
                "<h", segs, i * GNTDEV_GRANT_COPY_SEGMENT.size + status_at)
            if status != GNTST_okay:
                raise BadGrant(f"grant copy of grant {gref} failed with "
                               f"status {status}")

    def _map_page(self, gref):
        """Map one granted page writable: (mmap, gntdev index)."""
        req = map_grant_ref_request(self.domid, [gref])
        fcntl.ioctl(self._gntdev, IOCTL_GNTDEV_MAP_GRANT_REF, req)
        index = GNTDEV_MAP_GRANT_REF.unpack_from(req).index
        try:    # the hypervisor maps it here, or refuses the grant
            return mmap.mmap(self._gntdev, PAGE_SIZE, offset=index), index
        except OSError as e:
            fcntl.ioctl(self._gntdev, IOCTL_GNTDEV_UNMAP_GRANT_REF,
                        unmap_grant_ref_request(index, 1))
            raise BadGrant(f"grant {gref} will not map: {e}") from None

    def _unmap_page(self, page, index):
        page.close()            # munmap first, then unmap the grant
        fcntl.ioctl(self._gntdev, IOCTL_GNTDEV_UNMAP_GRANT_REF,
                    unmap_grant_ref_request(index, 1))

    def page(self, gref):
        if self.grants is not None:
            page = self.grants.page(gref)
            if page is not None:
                return bytes(page)
        local = ctypes.create_string_buffer(PAGE_SIZE)
        self._copy(local, [(gref, 0, PAGE_SIZE)], to_guest=False)
        return local.raw

    def buffer(self, segments, to_guest):
        if self.grants is not None:
            buf = self.grants.buffer(segments, to_guest)
            if buf is not None:
                return buf
        spans = [(gref, first * SECTOR_SIZE, (last - first + 1) * SECTOR_SIZE)
                 for gref, first, last in segments]
        local = ctypes.create_string_buffer(sum(n for _, _, n in spans))
        view = memoryview(local).cast("B")
        if to_guest:
            return GuestBuffer(view, lambda v: self._copy(local, spans, True))
        self._copy(local, spans, to_guest=False)
        return GuestBuffer(view)

    def close(self):
        if self.grants is not None:
            self.grants.close()
            self.grants = None
        if self.ring is not None:
            self.ring.close()           # munmap first, then unmap the grants
            fcntl.ioctl(self._gntdev, IOCTL_GNTDEV_UNMAP_GRANT_REF,
                        unmap_grant_ref_request(self._ring_index,
                                                self._ring_pages))
            self.ring = None
        if self._evtchn is not None:
            if hasattr(self, "port"):
                fcntl.ioctl(self._evtchn, IOCTL_EVTCHN_UNBIND,
                            port_request(self.port))
            os.close(self._evtchn)
            self._evtchn = None
        if self._gntdev is not None:
            os.close(self._gntdev)
            self._gntdev = None
