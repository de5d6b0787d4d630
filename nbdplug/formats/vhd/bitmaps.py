"""VHD sector bitmaps as integers whose bit i is sector i."""

# Bit order reversed within each byte: VHD numbers a bitmap's bits from the
# most significant, VHDX from the least.
_REVERSE = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def bits_of(raw):
    """A VHD sector bitmap as an int whose bit i is sector i."""
    return int.from_bytes(bytes(raw).translate(_REVERSE), "little")


def raw_bitmap(bits, size):
    """The `size` bytes of a VHD sector bitmap holding `bits`."""
    return bits.to_bytes(size, "little").translate(_REVERSE)


def span_bits(first, last):
    """Bits first .. last - 1 set."""
    return ((1 << (last - first)) - 1) << first
