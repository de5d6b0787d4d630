"""What every extent of a VMDK disk offers the driver.

An extent serves a contiguous range of the guest disk from one file.  Its
one mapping walk, `segments(offset, length)`, returns consecutive
(kind, length, where) triples, in nbdplug.disk's kinds, that pread,
pwrite, zero and map all use:

    DATA        stored plainly at host byte offset `where` of the file
    COMPRESSED  stored as the compressed grain with index `where`
    ZERO        reads as zeros (a ZERO extent, a zeroed grain)
    BACKING     not stored here: the parent disk, or zeros, shows through

Offsets passed to an extent are relative to the extent's start.
"""


class Extent:
    kind = None             # the descriptor's extent type

    def __init__(self, path, file, start, length, access):
        self.path = path
        self.file = file
        self.start = start          # guest byte offset of the first byte
        self.length = length
        self.access = access        # RW, RDONLY or NOACCESS

    def segments(self, offset, length):
        raise NotImplementedError

    def pwrite(self, buf, offset, background):
        """Write `buf` at `offset`.  `background(offset, length)`, in guest
        offsets, returns what an unallocated range shows (the parent's
        data or zeros)."""
        raise NotImplementedError

    def holes(self, where, length):
        """(length, is_hole) runs of DATA stored at host offset `where`."""
        return [(length, False)]

    def zero(self, offset, length, background_is_zero):
        """Make a range read as zeros where metadata alone can; return
        the (offset, length) ranges that still need zeros written.
        `background_is_zero(offset, length)` takes guest offsets."""
        return [(offset, length)]

    def info(self):
        return {"filename": self.path, "format": self.kind,
                "virtual-size": self.length}

    def close(self):
        if self.file is not None:
            self.file.close()
