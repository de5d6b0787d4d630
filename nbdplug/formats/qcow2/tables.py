"""Reading tables from the file, as qemu reads them: whatever lies past
the end of the file (however far) reads as zeros."""

from nbdplug.layout import be64_array

# qemu fails a read that reaches beyond this (its BDRV_MAX_LENGTH); check
# counts such a read as an error, as qemu-img check does.
MAX_READABLE = (1 << 63) - (1 << 30)


def read_at(file, length, offset):
    """`length` bytes at `offset`; whatever lies past the end of the
    file (however far) reads as zeros, as qemu reads it."""
    inside = max(0, min(length, file.size() - offset))
    data = file.read(inside, offset) if inside else bytearray()
    if inside < length:
        data += bytes(length - inside)
    return data


def load_table(file, offset, entries):
    """`entries` big-endian u64 table entries from the file."""
    return be64_array(read_at(file, entries * 8, offset))
