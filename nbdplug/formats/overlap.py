"""Metadata overlap checks: no write lands on metadata it is not for.

A damaged or hostile image can point a guest block at a table of its own
metadata.  Reading through such a pointer is harmless; writing would
overwrite the table.  So, as qemu's qcow2_check_metadata_overlap, a
writer checks every write first against the host space each kind of
metadata occupies: guest data against every kind, a metadata write
against every kind but its own.  A hit refuses the write, and the driver
then stops writing (Disk.stop_writing).

The map is kept per block of the host file (a cluster, or a sector where
tables need not be aligned), so a check is a dictionary lookup per block
written.
"""

from nbdplug.errors import CorruptImage


class Overlaps:
    """Which metadata occupies which host block: {block: kinds}, each
    kind a bit with a name in `names` (qemu's, where qemu has them)."""

    def __init__(self, block_bits, path, fmt, names):
        self.block_bits = block_bits
        self.path = path
        self.fmt = fmt
        self.names = names
        self.blocks = {}

    def add(self, offset, length, kind):
        for b in self._span(offset, length):
            self.blocks[b] = self.blocks.get(b, 0) | kind

    def remove(self, offset, length, kind):
        for b in self._span(offset, length):
            left = self.blocks.get(b, 0) & ~kind
            if left:
                self.blocks[b] = left
            else:
                self.blocks.pop(b, None)

    def check(self, offset, length, ignore=0):
        """Refuse (CorruptImage) a write of `length` bytes at host
        `offset` that would land on metadata of a kind other than
        `ignore`."""
        if not self.blocks:
            return
        for b in self._span(offset, length):
            hit = self.blocks.get(b, 0) & ~ignore
            if hit:
                name = self.names[hit & -hit]
                raise CorruptImage(self.path, self.fmt, "Preventing invalid "
                                   "write on metadata (overlaps with "
                                   f"{name})", f"host offset {offset:#x}")

    def _span(self, offset, length):
        bits = self.block_bits
        if length <= 0:
            return range(0)
        return range(offset >> bits, ((offset + length - 1) >> bits) + 1)
