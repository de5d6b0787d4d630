"""Positional I/O on the host file (or block device) behind an image.

Every driver reads and writes its file only through a HostFile, so the
tests can put a recording layer underneath (crash-state replay) and so
O_DIRECT needs handling in one place.  Nothing here moves a file offset:
all I/O is positional and safe from many threads.
"""

import contextlib
import ctypes
import errno
import mmap
import os
import stat
import threading

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SYNC_FILE_RANGE_WAIT_BEFORE = 0x1
SYNC_FILE_RANGE_WRITE = 0x2
SYNC_FILE_RANGE_WAIT_AFTER = 0x4
STREAM_LAG = 4

# O_DIRECT needs buffers, offsets and lengths aligned to the logical block
# size; 4096 covers 512e and 4Kn devices and every filesystem here.
DIRECT_ALIGN = 4096

# The C library this process already has (find_library would run ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                            ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_uint]


# The largest offset qemu's block layer addresses (BDRV_MAX_LENGTH):
# metadata placed beyond it is an image qemu cannot open.
QEMU_MAX_ADDRESS = (1 << 63) - (1 << 30)


def beyond_qemu_reach(offset, length):
    """Whether qemu fails to read `length` bytes at `offset`, taken modulo
    2**64 as qemu takes a sector count times 512."""
    offset &= (1 << 64) - 1
    return offset > QEMU_MAX_ADDRESS or length > QEMU_MAX_ADDRESS - offset


def fallocate(fd, mode, offset, length):
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class HostFile:
    """An open host file: positional reads and writes, flush, holes."""

    def __init__(self, path, readonly=True, direct=False, create=False):
        flags = os.O_RDONLY if readonly else os.O_RDWR
        flags |= os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        if direct:
            flags |= os.O_DIRECT
        self.path = path
        self.readonly = readonly
        self.direct = direct
        self.fd = os.open(path, flags, 0o644)
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
        except BaseException:
            os.close(self.fd)
            raise
        self._rmw_lock = threading.Lock()
        self._streamed = []         # ranges pwritev_streaming() wrote last

    # --- reads --------------------------------------------------------

    def pread(self, buf, offset):
        """Fill `buf` from `offset`; bytes past end of file read as zero."""
        if self.direct:
            return self._direct_pread(buf, offset)
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):
            self._finish_read(memoryview(buf), offset, n)

    def _finish_read(self, buf, offset, done):
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def preadv(self, bufs, offset):
        """Fill each buffer in turn from consecutive host bytes."""
        self._vectored(bufs, offset, self.pread, os.preadv,
                       self._finish_read)

    def _vectored(self, bufs, offset, one, vector, finish):
        """One system call for several buffers at consecutive offsets; a
        short transfer finished buffer by buffer."""
        if self.direct or len(bufs) == 1:
            for buf in bufs:
                one(buf, offset)
                offset += len(buf)
            return
        n = vector(self.fd, bufs, offset)
        if n < sum(len(b) for b in bufs):
            for buf in bufs:
                if n < len(buf):
                    finish(memoryview(buf), offset, max(n, 0))
                n -= len(buf)
                offset += len(buf)

    def read(self, length, offset):
        """Return `length` bytes from `offset` as a bytes-like object."""
        buf = bytearray(length)
        self.pread(buf, offset)
        return buf

    # --- writes -------------------------------------------------------

    def pwrite(self, buf, offset):
        if self.direct:
            return self._direct_pwrite(buf, offset)
        n = os.pwritev(self.fd, [buf], offset)
        if n < len(buf):
            self._finish_write(memoryview(buf), offset, n)

    def _finish_write(self, buf, offset, done):
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:], offset + done)

    def pwritev(self, bufs, offset):
        self._vectored(bufs, offset, self.pwrite, os.pwritev,
                       self._finish_write)

    def pwritev_streaming(self, bufs, offset):
        """pwritev for a bulk copy that nobody reads soon (the fill of a
        moving disk).  Its writeback starts at once, so that a flush
        finds little left to write, and what was written STREAM_LAG calls
        before leaves the page cache once written back: a copy through a
        few cached pages reused over and over costs far less system time
        than one that fills the cache with fresh pages.  Durability still
        takes a flush."""
        self.pwritev(bufs, offset)
        if self.direct:
            return
        length = sum(len(b) for b in bufs)
        _libc.sync_file_range(self.fd, offset, length, SYNC_FILE_RANGE_WRITE)
        with self._rmw_lock:
            self._streamed.append((offset, length))
            done = self._streamed[:-STREAM_LAG]
            del self._streamed[:-STREAM_LAG]
        for offset, length in done:         # (both advisory)
            _libc.sync_file_range(self.fd, offset, length,
                                  SYNC_FILE_RANGE_WAIT_BEFORE |
                                  SYNC_FILE_RANGE_WRITE |
                                  SYNC_FILE_RANGE_WAIT_AFTER)
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, offset, length,
                                 os.POSIX_FADV_DONTNEED)

    def flush(self):
        os.fdatasync(self.fd)

    def truncate(self, size):
        os.ftruncate(self.fd, size)

    def punch(self, offset, length):
        """Deallocate a range (it then reads as zeros); may raise
        EOPNOTSUPP where the filesystem or device cannot."""
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  offset, length)

    def zero_range(self, offset, length):
        """Make a range read as zeros, keeping it allocated."""
        fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                  offset, length)

    def write_zeroes(self, offset, length):
        """Zero a range the slow way, by writing zeros (bounded memory)."""
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(chunk))
            self.pwrite(memoryview(chunk)[:n], offset)
            offset += n
            length -= n

    # --- allocation ---------------------------------------------------

    def size(self):
        return os.lseek(self.fd, 0, os.SEEK_END)

    def allocated_bytes(self):
        return 0 if self.is_block else os.fstat(self.fd).st_blocks * 512

    def next_data(self, offset):
        """Offset of the next data at or after `offset`; size at the end."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return self.size()
            raise

    def next_hole(self, offset):
        return os.lseek(self.fd, offset, os.SEEK_HOLE)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- O_DIRECT -----------------------------------------------------

    @staticmethod
    def _span(offset, length):
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        return start, end

    def _direct_pread(self, buf, offset):
        start, end = self._span(offset, len(buf))
        with mmap.mmap(-1, end - start) as bounce:      # page aligned
            view = memoryview(bounce)
            try:
                done = 0
                while done < len(view):
                    n = os.preadv(self.fd, [view[done:]], start + done)
                    if n == 0:
                        view[done:] = bytes(len(view) - done)
                        break
                    done += n
                head = offset - start
                buf[:] = view[head:head + len(buf)]
            finally:
                view.release()

    def _direct_pwrite(self, buf, offset):
        start, end = self._span(offset, len(buf))
        aligned = start == offset and end == offset + len(buf)
        with mmap.mmap(-1, end - start) as bounce:
            view = memoryview(bounce)
            try:
                if aligned:
                    view[:] = buf
                    self._direct_write_all(view, start)
                    return
                # Read-modify-write of the partial blocks; serialised so
                # two unaligned writes to one block cannot lose each other.
                with self._rmw_lock:
                    self._direct_pread(view, start)
                    head = offset - start
                    view[head:head + len(buf)] = buf
                    self._direct_write_all(view, start)
            finally:
                view.release()

    def _direct_write_all(self, view, offset):
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)


class DeferredFlushFile(HostFile):
    """A HostFile whose flushes wait until the caller syncs at the end.

    For a conversion target only: nothing references the new image until
    the conversion has succeeded (a failed one is deleted), so the
    ordering flushes a driver issues while writing it protect nothing,
    and the one sync at the end (sync_all) makes the whole image durable
    before success is reported, as qemu-img's default cache mode does.
    """

    def flush(self):
        pass

    def sync(self):
        os.fsync(self.fd)
