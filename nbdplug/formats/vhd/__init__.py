"""vpc: Microsoft Virtual Hard Disk (VHD) images, fixed, dynamic and
differencing, read and write.

Reference: Microsoft, "Virtual Hard Disk Image Format Specification" 1.0
(October 2006).  Peer: qemu's block/vpc.c (format name "vpc").

    fixed:    guest bytes | footer
    dynamic:  footer copy | dynamic header | [parent locator data] | BAT |
              block | block | ... | footer
    block:    sector bitmap (a bit per 512-byte sector, most significant
              bit first, padded to whole sectors) | block_size data bytes

A sector whose bitmap bit is clear reads from the parent (differencing).
A dynamic disk's allocated block reads whole, whatever its bitmap says, as
qemu reads it (the specification's "never modified" sectors are zeros
there).  All values are big-endian.

Nothing points at bytes that are not yet durable: a new block's data,
bitmap and the footer moved past it, then its BAT entry; data before the
bitmap bits that claim it.  Discard clears bitmap bits and releases
blocks that become empty (the BAT entry is reset, durably, before the
space is truncated away or punched).  A crash may leave the end of the
file without its footer: the copy at offset 0, which never changes,
stands in (the specification keeps it for that), and a writable open or
`check -r leaks` puts the footer back."""

from nbdplug.disk import FormatSpec

from . import create, rebase
from .disk import VhdDisk

SPEC = FormatSpec("vpc", open=VhdDisk.open, probe=VhdDisk.probe,
                  create=create.create, create_options=create.OPTIONS,
                  backing=True, check=VhdDisk.check, rebase=rebase.rebase)

__all__ = ["VhdDisk", "SPEC"]
