"""The Xen block-device ABI, declared once: blkif ring layouts for the
native x86_64 and the x86_32 protocols, xenbus states, and the gntdev and
evtchn device interface that reaches a guest's memory and event channels.

Every layout, constant and ioctl number here is asserted by the tests
against a probe compiled from Xen's installed headers (xen/io/blkif.h,
ring.h, xenbus.h, protocols.h, grant_table.h, xen/sys/gntdev.h and
evtchn.h), natively and with gcc -m32 for the x86_32 layouts.  Field names
are the headers'; padding the compiler inserts is named pad1, pad2...
All values are little-endian (x86).
"""

import dataclasses
import struct

from nbdplug.layout import Layout

PAGE_SIZE = 4096            # grant granularity, whatever the guest's pages
SECTOR_SIZE = 512           # blkif sectors are always 512 bytes
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE

# --- blkif.h operations, limits, status codes ---------------------------

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_DISCARD_SECURE = 1 << 0

BLKIF_RSP_OKAY = 0
BLKIF_RSP_ERROR = -1
BLKIF_RSP_EOPNOTSUPP = -2

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# --- the shared ring (ring.h) ---------------------------------------------

SRING_HEADER = Layout("<", "blkif sring", "req_prod:I req_event:I "
                      "rsp_prod:I rsp_event:I pvt:4s pad:44s")

RING_IDX_MASK = 0xFFFFFFFF  # indices run free as uint32
# The largest ring we map: 16 pages, as Linux (XENBUS_MAX_RING_GRANT_ORDER)
# and QEMU allow.
MAX_RING_PAGE_ORDER = 4

BLKIF_REQUEST_SEGMENT = Layout("<", "blkif request segment",
                               "gref:I first_sect:B last_sect:B pad1:2s")
SEGMENTS_PER_INDIRECT_PAGE = PAGE_SIZE // BLKIF_REQUEST_SEGMENT.size

# --- xenbus.h states --------------------------------------------------------

XenbusStateUnknown = 0
XenbusStateInitialising = 1
XenbusStateInitWait = 2
XenbusStateInitialised = 3
XenbusStateConnected = 4
XenbusStateClosing = 5
XenbusStateClosed = 6
XenbusStateReconfiguring = 7
XenbusStateReconfigured = 8

# --- protocols (protocols.h) ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One blkif ABI: its request, discard, indirect and response layouts
    and the ring entry stride (the larger of request and response)."""
    name: str
    request: Layout
    discard: Layout
    indirect: Layout
    response: Layout

    @property
    def stride(self):
        return max(self.request.size, self.response.size)

    def ring_size(self, nbytes):
        """Entries in a ring of `nbytes` mapped bytes: as __RING_SIZE, the
        entries that fit after the header, rounded down to a power of 2."""
        fit = (nbytes - SRING_HEADER.size) // self.stride
        if fit < 1:
            raise ValueError(f"{nbytes} bytes hold no {self.name} ring entry")
        return 1 << (fit.bit_length() - 1)


_SEGS = f"seg:{BLKIF_MAX_SEGMENTS_PER_REQUEST * BLKIF_REQUEST_SEGMENT.size}s"
_GREFS = f"indirect_grefs:{4 * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}s"

# Native x86_64: uint64_t members are 8-byte aligned.
X86_64 = Protocol(
    "x86_64-abi",
    Layout("<", "blkif request", "operation:B nr_segments:B handle:H "
           "pad1:4s id:Q sector_number:Q " + _SEGS),
    Layout("<", "blkif request discard", "operation:B flag:B handle:H "
           "pad1:4s id:Q sector_number:Q nr_sectors:Q"),
    Layout("<", "blkif request indirect", "operation:B indirect_op:B "
           "nr_segments:H pad1:4s id:Q sector_number:Q handle:H pad2:2s "
           + _GREFS + " pad3:4s"),
    Layout("<", "blkif response", "id:Q operation:B pad1:1s status:h "
           "pad2:4s"))

# i386: uint64_t members are only 4-byte aligned, so nothing is padded
# (the indirect request has an explicit uint64_t pad under __i386__).
X86_32 = Protocol(
    "x86_32-abi",
    Layout("<", "blkif x86_32 request", "operation:B nr_segments:B "
           "handle:H id:Q sector_number:Q " + _SEGS),
    Layout("<", "blkif x86_32 request discard", "operation:B flag:B "
           "handle:H id:Q sector_number:Q nr_sectors:Q"),
    Layout("<", "blkif x86_32 request indirect", "operation:B "
           "indirect_op:B nr_segments:H id:Q sector_number:Q handle:H "
           "pad1:2s " + _GREFS + " pad:8s"),
    Layout("<", "blkif x86_32 response", "id:Q operation:B pad1:1s "
           "status:h"))

PROTOCOLS = {p.name: p for p in (X86_64, X86_32)}
XEN_IO_PROTO_ABI_NATIVE = X86_64.name

# The default when a frontend writes no "protocol" key: Linux blkback and
# tapback assume x86_32 on x86 (BLKIF_PROTOCOL_DEFAULT); modern frontends
# always write the key.
PROTOCOL_DEFAULT = X86_32.name

INDIRECT_GREFS = struct.Struct(f"<{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}I")

# --- gntdev and evtchn devices (xen/sys/gntdev.h, evtchn.h) ----------------


def _IOC_NONE(kind, nr, size):
    """_IOC(_IOC_NONE, kind, nr, size): these ioctls carry no direction
    bits although data flows both ways."""
    return (size << 16) | (ord(kind) << 8) | nr


GNTDEV_GRANT_REF = Layout("<", "ioctl gntdev grant ref", "domid:I ref:I")
GNTDEV_MAP_GRANT_REF = Layout("<", "ioctl gntdev map grant ref",
                              "count:I pad:I index:Q")   # then refs[count]
GNTDEV_UNMAP_GRANT_REF = Layout("<", "ioctl gntdev unmap grant ref",
                                "index:Q count:I pad:I")
GNTDEV_GRANT_COPY = Layout("<", "ioctl gntdev grant copy",
                           "count:I pad1:4s segments:Q")
# One side of a copy segment is a local address (virt:Q), the other a
# foreign grant.  Note the order ref, offset, domid: the hypercall's
# gnttab_copy orders them ref, domid, offset.
GNTDEV_GRANT_COPY_FOREIGN = Layout("<", "gntdev copy foreign",
                                   "ref:I offset:H domid:H")
GNTDEV_GRANT_COPY_SEGMENT = Layout("<", "ioctl gntdev grant copy segment",
                                   "source:8s dest:8s len:H flags:H "
                                   "status:h pad1:2s")

IOCTL_GNTDEV_MAP_GRANT_REF = _IOC_NONE(
    "G", 0, GNTDEV_MAP_GRANT_REF.size + GNTDEV_GRANT_REF.size)
IOCTL_GNTDEV_UNMAP_GRANT_REF = _IOC_NONE("G", 1, GNTDEV_UNMAP_GRANT_REF.size)
IOCTL_GNTDEV_GRANT_COPY = _IOC_NONE("G", 8, GNTDEV_GRANT_COPY.size)

GNTCOPY_source_gref = 1 << 0    # guest -> local (WRITE requests)
GNTCOPY_dest_gref = 1 << 1      # local -> guest (READ requests)

GNTST_okay = 0
GNTST_bad_gntref = -3
GNTST_permission_denied = -8

EVTCHN_BIND_INTERDOMAIN = Layout("<", "ioctl evtchn bind interdomain",
                                 "remote_domain:I remote_port:I")
EVTCHN_PORT = Layout("<", "ioctl evtchn port", "port:I")  # unbind, notify

IOCTL_EVTCHN_BIND_INTERDOMAIN = _IOC_NONE("E", 1,
                                          EVTCHN_BIND_INTERDOMAIN.size)
IOCTL_EVTCHN_UNBIND = _IOC_NONE("E", 3, EVTCHN_PORT.size)
IOCTL_EVTCHN_NOTIFY = _IOC_NONE("E", 4, EVTCHN_PORT.size)
