"""`nbdplug resize`: change an image's virtual size, as qemu-img resize."""

from nbdplug.errors import UnsupportedFeature, UsageError
from nbdplug.formats import FORMATS
from nbdplug.hostfile import HostFile
from nbdplug.opener import (check_format, check_openable, image_name,
                            names_a_file, open_image, probe)


def resize_image(path, size, format=None, shrink=False, relative=False,
                 policy=None, file_factory=HostFile):
    """Set the virtual size of the image at `path` to `size` bytes (with
    `relative`, change it by `size`), like qemu-img resize; returns the
    new size.  The image is opened (and locked) writable by the opener."""
    check_format(format)
    path, format = image_name(path, format)
    if not names_a_file(path):
        raise UsageError(f"{path}: only image files can be resized")
    check_openable(path)
    fmt = format or probe(path)
    # Refused before opening: opening some formats writable writes.
    if fmt is not None and FORMATS[fmt].resize is None:
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
        FORMATS[disk.format_name].resize(disk, new, shrink)
    return new
