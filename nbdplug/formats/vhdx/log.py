"""The VHDX log, replayed into memory, and CRC-32C, which checksums it
and every other VHDX structure.

Reference: [MS-VHDX] 2.3 (log), 2.3.3 (replay).  The log is a circular
buffer of 4 KiB sectors holding entries; an entry is a header, descriptors
(zero this range; write this 4 KiB sector) and the data sectors they
describe.  The entry with the highest sequence number whose checksum holds
is the head; its `tail` field names the oldest entry still needed, and the
entries from tail to head, with consecutive sequence numbers, are the
active sequence.  Replaying it yields what the file would hold after the
writes the log protects; we keep that as an overlay over the file, which
is never written.
"""

import bisect
import struct

from nbdplug.errors import CorruptImage, UnsupportedFeature
from nbdplug.layout import Layout

FMT = "vhdx"
LOG_SECTOR = 4096
MiB = 1 << 20
# Hyper-V and qemu write 1 MiB logs; a bigger one to replay in memory is
# refused rather than read whole.
MAX_LOG_LENGTH = 32 * MiB

LOG_ENTRY_HEADER = Layout("<", "vhdx log entry header",
                          "signature:4s checksum:I entry_length:I tail:I "
                          "sequence_number:Q descriptor_count:I reserved:I "
                          "log_guid:16s flushed_file_offset:Q "
                          "last_file_offset:Q")
ZERO_DESCRIPTOR = Layout("<", "vhdx zero descriptor",
                         "signature:4s reserved:I zero_length:Q "
                         "file_offset:Q sequence_number:Q")
DATA_DESCRIPTOR = Layout("<", "vhdx data descriptor",
                         "signature:4s trailing_bytes:4s leading_bytes:8s "
                         "file_offset:Q sequence_number:Q")
DATA_SECTOR = Layout("<", "vhdx data sector",
                     "signature:4s sequence_high:I data:4084s "
                     "sequence_low:I")
DESCRIPTOR_SIZE = 32


def _crc_tables():
    """Slicing-by-8 tables for CRC-32C (reflected polynomial 0x82F63B78):
    tables[k][b] is the CRC of byte b followed by k zero bytes."""
    first = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        first.append(c)
    tables = [first]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(c >> 8) ^ first[c & 0xFF] for c in prev])
    return tables


_CRC_TABLES = _crc_tables()
_WORDS = struct.Struct("<II")


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli), chained as zlib.crc32 is: pass the previous
    result as `crc` to continue it.  Eight bytes a step (about 15 MB/s)."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _CRC_TABLES
    data = bytes(data)
    whole = len(data) - len(data) % 8
    crc ^= 0xFFFFFFFF
    for low, high in _WORDS.iter_unpack(data[:whole]):
        low ^= crc
        crc = (t7[low & 0xFF] ^ t6[low >> 8 & 0xFF] ^ t5[low >> 16 & 0xFF]
               ^ t4[low >> 24] ^ t3[high & 0xFF] ^ t2[high >> 8 & 0xFF]
               ^ t1[high >> 16 & 0xFF] ^ t0[high >> 24])
    for b in data[whole:]:
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def checksum_ok(buf, field_offset=4):
    """Does the CRC-32C of `buf`, its checksum field read as zero, match
    that field?"""
    stored = int.from_bytes(buf[field_offset:field_offset + 4], "little")
    crc = crc32c(buf[:field_offset])
    crc = crc32c(bytes(4), crc)
    return crc32c(buf[field_offset + 4:], crc) == stored


class Overlay:
    """The host file as the replayed log leaves it: 4 KiB data sectors and
    zeroed ranges laid over the file's own bytes.  Read-only."""

    def __init__(self, file, pages, zeros, size):
        self.file = file
        self.path = file.path
        self._pages = pages             # 4 KiB aligned offset -> bytes
        self._zeros = _merge(zeros)     # sorted, disjoint (start, end)
        self._starts = [z[0] for z in self._zeros]
        self._size = size

    def size(self):
        return max(self.file.size(), self._size)

    def pread(self, buf, offset):
        view = memoryview(buf)
        self.file.pread(view, offset)
        end = offset + len(view)
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        for start, stop in self._zeros[i:]:
            if start >= end:
                break
            a, b = max(start, offset), min(stop, end)
            if a < b:
                view[a - offset:b - offset] = bytes(b - a)
        page = offset - offset % LOG_SECTOR
        while page < end and self._pages:
            data = self._pages.get(page)
            if data is not None:
                a, b = max(page, offset), min(page + LOG_SECTOR, end)
                view[a - offset:b - offset] = data[a - page:b - page]
            page += LOG_SECTOR

    def read(self, length, offset):
        buf = bytearray(length)
        self.pread(buf, offset)
        return buf

    def close(self):
        self.file.close()


def _merge(ranges):
    out = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def replay(file, header, path):
    """An Overlay with the header's active log sequence applied, or None
    when there is nothing to replay."""
    if header.log_guid == bytes(16):
        return None
    length, offset = header.log_length, header.log_offset
    if length > MAX_LOG_LENGTH:
        raise UnsupportedFeature(path, FMT, f"a log of {length} bytes is "
                                 "too large to replay in memory",
                                 "header.log_length")
    log = bytes(file.read(length, offset))
    head = _find_head(log, header.log_guid, path)
    if head is None:
        # The header named a log, but no entry was completed under it.
        return None
    entries = _sequence(log, head, header.log_guid, path)
    last = entries[-1][1]
    file_size = file.size()
    if last.flushed_file_offset > file_size:
        raise CorruptImage(path, FMT, "the file is shorter than its log "
                           f"says it was ({last.flushed_file_offset} bytes);"
                           " was it truncated?", "log")
    pages, zeros = {}, []
    for pos, hdr, entry in entries:
        _apply(entry, hdr, pos, pages, zeros, path)
    return Overlay(file, pages, zeros, last.last_file_offset)


def _entry(log, pos, length):
    """`length` bytes of the circular log from `pos`, wrapping."""
    end = pos + length
    if end <= len(log):
        return log[pos:end]
    return log[pos:] + log[:end - len(log)]


def _header_at(log, pos, log_guid, path):
    """The entry header at `pos` if it belongs to this log, else None.
    One that does, yet cannot be an entry, is an error: the log is
    written by whoever wrote this header, not by chance."""
    hdr = LOG_ENTRY_HEADER.unpack_from(log, pos)
    if hdr.signature != b"loge" or hdr.log_guid != log_guid:
        return None
    field = f"log entry at {pos}"
    n = hdr.entry_length
    if n == 0 or n % LOG_SECTOR or n > len(log):
        raise CorruptImage(path, FMT, f"entry length {n} is not a whole "
                           f"number of sectors within the {len(log)}-byte "
                           "log", field)
    desc_sectors = -(-(LOG_ENTRY_HEADER.size + DESCRIPTOR_SIZE *
                       hdr.descriptor_count) // LOG_SECTOR)
    if desc_sectors > n // LOG_SECTOR:
        raise CorruptImage(path, FMT, f"{hdr.descriptor_count} descriptors "
                           f"do not fit in {n} bytes", field)
    if hdr.tail % LOG_SECTOR or hdr.tail >= len(log) or \
            hdr.sequence_number == 0:
        raise CorruptImage(path, FMT, "tail or sequence number out of "
                           "range", field)
    return hdr


def _find_head(log, log_guid, path):
    """(position, header) of the newest entry whose checksum holds."""
    candidates = []
    for pos in range(0, len(log), LOG_SECTOR):
        hdr = _header_at(log, pos, log_guid, path)
        if hdr is not None:
            candidates.append((hdr.sequence_number, pos, hdr))
    # Torn entries (checksum wrong) are skipped, newest first; checking
    # more bytes than the log holds means it is damaged, not torn.
    budget = len(log)
    for _, pos, hdr in sorted(candidates, reverse=True):
        if checksum_ok(_entry(log, pos, hdr.entry_length)):
            return pos, hdr
        budget -= hdr.entry_length
        if budget < 0:
            raise CorruptImage(path, FMT, "too many log entries fail "
                               "their checksums", "log")
    return None


def _sequence(log, head, log_guid, path):
    """[(position, header, entry bytes)] from the head's tail to the head,
    each valid and numbered one after the other."""
    head_pos, head_hdr = head
    pos, entries = head_hdr.tail, []
    for _ in range(len(log) // LOG_SECTOR):
        hdr = _header_at(log, pos, log_guid, path)
        entry = hdr and _entry(log, pos, hdr.entry_length)
        if hdr is None or not checksum_ok(entry) or (
                entries and hdr.sequence_number !=
                entries[-1][1].sequence_number + 1):
            raise CorruptImage(path, FMT, f"the log sequence from its tail "
                               f"at {head_hdr.tail} to its head at "
                               f"{head_pos} is broken at {pos}", "log")
        entries.append((pos, hdr, entry))
        if pos == head_pos:
            return entries
        pos = (pos + hdr.entry_length) % len(log)
    raise CorruptImage(path, FMT, "the log sequence does not reach its "
                       "head", "log")


def _apply(entry, hdr, pos, pages, zeros, path):
    """Lay one entry's zero and data descriptors over `pages`/`zeros`."""
    field = f"log entry at {pos}"
    seq = hdr.sequence_number
    data_at = -(-(LOG_ENTRY_HEADER.size + DESCRIPTOR_SIZE *
                  hdr.descriptor_count) // LOG_SECTOR) * LOG_SECTOR
    for i in range(hdr.descriptor_count):
        at = LOG_ENTRY_HEADER.size + DESCRIPTOR_SIZE * i
        signature = entry[at:at + 4]
        if signature == b"zero":
            desc = ZERO_DESCRIPTOR.unpack_from(entry, at)
            length = desc.zero_length
        elif signature == b"desc":
            desc = DATA_DESCRIPTOR.unpack_from(entry, at)
            length = LOG_SECTOR
        else:
            raise CorruptImage(path, FMT, f"descriptor {i} has signature "
                               f"{bytes(signature)!r}", field)
        start = desc.file_offset
        if desc.sequence_number != seq or start % LOG_SECTOR or \
                length % LOG_SECTOR or \
                start + length > hdr.last_file_offset:
            raise CorruptImage(path, FMT, f"descriptor {i} is out of "
                               "sequence or range", field)
        if signature == b"zero":
            for page in [p for p in pages if start <= p < start + length]:
                del pages[page]
            zeros.append((start, start + length))
            continue
        if data_at + LOG_SECTOR > len(entry):
            raise CorruptImage(path, FMT, f"descriptor {i} has no data "
                               "sector", field)
        sector = DATA_SECTOR.unpack_from(entry, data_at)
        if sector.signature != b"data" or \
                (sector.sequence_high << 32 | sector.sequence_low) != seq:
            raise CorruptImage(path, FMT, f"data sector of descriptor {i} "
                               "is damaged", field)
        pages[start] = desc.leading_bytes + sector.data + \
            desc.trailing_bytes
        data_at += LOG_SECTOR
