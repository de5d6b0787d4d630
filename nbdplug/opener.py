"""Opening an image: pick the driver, then open its backing chain.

FORMATS is the one table of drivers; the CLI's -f choices come from it.
A format is probed only when the caller gives none, and probing never
chooses raw for a writable image: a guest that writes a qcow2 header into
its raw disk must not turn it into a qcow2 with a backing file of its
choosing.  Backing files are opened read-only, through the same policy.
"""

import os
import stat

from . import policy as _policy
from .formats import ram, nbd as remote
from .locking import ImageLock
from .errors import ImageError, PolicyError, UnsupportedFeature, UsageError
from .hostfile import HostFile
from .formats import FORMATS
from .ops.rebase import copy_differences

# A chain deeper than this is refused (and loops are caught earlier).
MAX_CHAIN_DEPTH = 64


class OpenContext:
    """What one chain's drivers share while opening: the policy, O_DIRECT,
    format-specific options, the files already in the chain, and the one
    way drivers open host files (tests put a recording layer there)."""

    def __init__(self, policy, direct=False, options=None, chain=(),
                 file_factory=HostFile, share=False):
        self.policy = policy
        self.direct = direct
        self.options = dict(options or {})
        self.chain = tuple(chain)
        self.file_factory = file_factory
        self.share = share      # qemu's --force-share, for the whole chain
        self.skip_backing = False   # the top image's backing is not opened

    def open_file(self, path, readonly):
        """Open a host file for a driver (honouring O_DIRECT)."""
        return self.file_factory(path, readonly=readonly,
                                 direct=self.direct)

    def open_backing(self, referrer, referrer_fmt, name, fmt, field):
        """Open the file `name` that `referrer` (of format `referrer_fmt`)
        refers to in its `field`, read-only.

        `fmt` is the format the referrer records, or None to probe (safe
        here: a backing file is never opened for writing).
        """
        if self.skip_backing:
            return None         # rebase -u: the old reference may be stale
        path = self.policy.resolve(referrer, name, referrer_fmt, field)
        if path in self.chain or len(self.chain) >= MAX_CHAIN_DEPTH:
            raise PolicyError(referrer, referrer_fmt,
                              f"{name!r} makes the backing chain loop or "
                              f"exceed {MAX_CHAIN_DEPTH} levels", field)
        if fmt is not None and fmt not in FORMATS:
            raise ImageError(referrer, referrer_fmt,
                             f"backing format {fmt!r} is not supported",
                             field)
        child = OpenContext(self.policy, self.direct, None,
                            self.chain + (path,), self.file_factory,
                            self.share)
        return _open(path, fmt, True, child)


def open_image(path, format=None, readonly=True, policy=None, direct=False,
               options=None, file_factory=HostFile, share=False):
    """Open the image at `path` and its backing chain as a Disk.

    `options` are format-specific (e.g. a qcow2 snapshot to open);
    `file_factory` replaces HostFile (the crash-state tests record I/O);
    `share` reads an image others may be writing (qemu's --force-share).
    An NBD URI (nbd://, nbds://, nbd+unix://...) opens a remote export.
    """
    if remote.is_uri(path):
        return remote.NbdDisk.open(path, format, readonly, options)
    _known(format)
    path, format = _ram_name(path, format)
    ctx = _context(path, policy, direct, options, file_factory)
    ctx.share = share
    return _open(path, format, readonly, ctx)


def _known(fmt):
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (known: "
                         + ", ".join(sorted(FORMATS)) + ")")


def names_a_file(name):
    """False for names that are not paths: NBD URIs and ram:NAME."""
    return not (remote.is_uri(name) or (isinstance(name, str) and
                                        name.startswith("ram:")))


def _ram_name(path, fmt, create=False):
    """`ram:NAME` (or, when creating with -f ram, a bare NAME) names a
    shared RAM disk: its file and format (see ram.py)."""
    named = isinstance(path, str) and path.startswith("ram:")
    if not (named or (create and fmt == "ram")):
        return path, fmt
    if fmt not in (None, "ram"):
        raise UsageError(f"{path}: a RAM disk has format ram, not {fmt}")
    return ram.path_for(path), "ram"


def _context(path, policy, direct=False, options=None,
             file_factory=HostFile):
    return OpenContext((policy or _policy.DEFAULT).for_image(path), direct,
                       options, (os.path.realpath(path),), file_factory)


def check_image(path, format=None, repair=None, policy=None):
    """Check (and with repair='leaks'|'all', repair) one image's own
    metadata; returns a check.CheckReport.  Raises UnsupportedFeature for
    formats without a check."""
    _known(format)
    path, format = _ram_name(path, format)
    check_openable(path)
    fmt = format or probe(path) or "raw"
    driver = FORMATS[fmt]
    if not hasattr(driver, "check"):
        raise UnsupportedFeature(path, fmt,
                                 "this image format does not support checks")
    return driver.check(path, _context(path, policy), repair)


def resize_image(path, size, format=None, shrink=False, relative=False,
                 policy=None, file_factory=HostFile):
    """Set the virtual size of the image at `path` to `size` bytes (with
    `relative`, change it by `size`), like qemu-img resize; returns the
    new size.  The image is opened (and locked) writable by the opener."""
    _known(format)
    path, format = _ram_name(path, format)
    if not names_a_file(path):
        raise UsageError(f"{path}: only image files can be resized")
    check_openable(path)
    fmt = format or probe(path)
    # Refused before opening: opening some formats writable writes.
    if fmt is not None and getattr(FORMATS[fmt], "resize", None) is None:
        raise UnsupportedFeature(path, fmt, f"resizing {fmt} images is "
                                 "not supported")
    with open_image(path, fmt, readonly=False, policy=policy,
                    file_factory=file_factory) as disk:
        new = disk.size + size if relative else size
        if new <= 0:
            raise UsageError("new image size must be positive")
        if new < disk.size and not shrink:
            raise UsageError(f"{path}: use the --shrink option to perform "
                             "a shrink operation")
        type(disk).resize(disk, new, shrink)
    return new


def _open(path, fmt, readonly, ctx):
    check_openable(path)
    if fmt is None:
        fmt = probe(path)
        if fmt is None:
            if not readonly:
                raise ImageError(path, None,
                                 "format not recognised; say -f raw to "
                                 "open it writable as raw")
            fmt = "raw"
    lock = None
    try:
        # Locked before the driver reads a byte, as qemu does (locking.py);
        # a RAM disk is meant to be written by several servers at once.
        if fmt != "ram":
            lock = ImageLock(path, readonly, ctx.share)
        disk = FORMATS[fmt].open(path, readonly, ctx)
    except BaseException as e:
        if lock is not None:
            lock.release()
        if isinstance(e, OSError):
            raise ImageError(path, fmt, e.strerror or str(e)) from None
        raise
    if lock is not None:
        _unlock_on_close(disk, lock)
    return disk


def _unlock_on_close(disk, lock):
    close = disk.close

    def close_and_unlock():
        try:
            close()
        finally:
            lock.release()
    disk.close = close_and_unlock


def check_openable(path):
    """Refuse what is not a regular file or block device, in one line."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(path, None, e.strerror) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(path, None, "is a directory, not an image")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(path, None, "is not a regular file or block device")


def probe(path):
    """Name of the non-raw format whose signature `path` carries, or None."""
    try:
        file = HostFile(path, readonly=True)
    except OSError as e:
        raise ImageError(path, None, e.strerror) from None
    try:
        for name, driver in FORMATS.items():
            if driver.probe(file):
                return name
        return None
    finally:
        file.close()


def create_image(path, fmt, size, options=None, backing=None,
                 backing_fmt=None, policy=None):
    """Create a new image; `size` may be None when a backing file gives it."""
    _known(fmt)
    path, fmt = _ram_name(path, fmt, create=True)
    if fmt is None:
        raise UsageError("the format of a new image is needed (-f)")
    if os.path.lexists(path):
        raise UsageError(f"{path}: already exists")
    driver = FORMATS[fmt]
    backing_disk = None
    try:
        if backing is not None:
            ctx = _context(path, policy)
            backing_disk = ctx.open_backing(path, fmt, backing, backing_fmt,
                                            "backing file")
            if size is None:
                size = backing_disk.size
        if size is None:
            raise UsageError("a size is needed (or a backing file)")
        driver.create(path, size, dict(options or {}), backing=backing,
                      backing_fmt=backing_fmt or (
                          backing_disk.format_name if backing_disk else None))
    finally:
        if backing_disk is not None:
            backing_disk.close()


def rebase_image(path, fmt=None, backing=None, backing_fmt=None,
                 unsafe=False, policy=None):
    """Point the image at `path` at backing file `backing` ("" or None:
    none), like qemu-img rebase.  Safe mode first copies into the image
    whatever the old chain supplies that the new chain reads differently;
    `unsafe` only rewrites the reference (the old chain is not opened).
    """
    _known(fmt)
    _known(backing_fmt)
    if not names_a_file(path):
        raise UsageError(f"{path}: only image files can be rebased")
    backing = backing or None
    if backing is None and backing_fmt:
        raise UsageError("-F needs a backing file (-b)")
    check_openable(path)
    fmt = fmt or probe(path) or "raw"
    driver = FORMATS[fmt]
    if not hasattr(driver, "rebase"):
        raise UnsupportedFeature(path, fmt, "rebase is not supported for "
                                 "this image format")
    # The new chain is opened first, through the policy (roots, loops,
    # the image itself), so bad input fails before the image is opened.
    new = None
    if backing is not None:
        new = _context(path, policy).open_backing(path, fmt, backing,
                                                  backing_fmt,
                                                  "backing file")
    try:
        ctx = _context(path, policy)
        ctx.skip_backing = unsafe
        with _open(path, fmt, False, ctx) as disk:
            def copy():
                copy_differences(disk, new)
                disk.flush()
            driver.rebase(disk, backing, backing_fmt or (
                new.format_name if new is not None else None), new,
                None if unsafe else copy)
    finally:
        if new is not None:
            new.close()
