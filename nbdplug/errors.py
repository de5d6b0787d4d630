"""Errors raised by image drivers and the opener.

Every error renders as one line that names the file, the format and the
field at fault, in the register of qemu-img's messages.  The tree is
grouped by what a caller can do about it:

- ImageError: the image cannot be used as asked (the root);
- CorruptImage: metadata is inconsistent or hostile;
- UnsupportedFeature: valid, but something we refuse to handle;
- PolicyError: a backing/extent file outside what the caller allowed;
- ReadOnlyDisk: a write to a disk opened (or turned) read-only;
- RequestError: a request the disk cannot take (out of range);
- UsageError: bad arguments from a person (exit code 2, no image named).
"""

import errno


class ImageError(Exception):
    """The image at `path` cannot be used; `field` names the culprit."""

    errno = errno.EIO

    def __init__(self, path, fmt, reason, field=None):
        super().__init__(path, fmt, reason, field)
        self.path = path
        self.fmt = fmt
        self.reason = reason
        self.field = field

    def __str__(self):
        where = f"{self.path}" if self.path else "image"
        if self.fmt:
            where += f" ({self.fmt})"
        what = f"{self.field}: " if self.field else ""
        return f"{where}: {what}{self.reason}"


class CorruptImage(ImageError):
    """Metadata that is inconsistent, out of range or hostile."""


class UnsupportedFeature(ImageError):
    """A valid image using something nbdplug refuses to handle."""

    errno = errno.ENOTSUP


class PolicyError(ImageError):
    """A referenced file lies outside what the open policy allows."""

    errno = errno.EPERM


class ReadOnlyDisk(ImageError):
    """A write was attempted on a read-only disk."""

    errno = errno.EROFS


class RequestError(ImageError):
    """A request outside the disk or otherwise malformed."""

    errno = errno.EINVAL


class UsageError(Exception):
    """A bad command line or argument; reported as one line, exit 2."""
