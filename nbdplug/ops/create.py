"""`nbdplug create`: a new image of any format that can be created."""

import os

from nbdplug import options as _options
from nbdplug.disk import Backing
from nbdplug.errors import UsageError
from nbdplug.formats import FORMATS
from nbdplug.opener import check_format, image_name, new_context, probe


def create_image(path, fmt, size, options=None, backing=None,
                 backing_fmt=None, policy=None):
    """Create a new image; `size` may be None when a backing file gives it.
    `options` are `-o` texts (name → text), checked against the format's
    declared options."""
    check_format(fmt)
    path, fmt = image_name(path, fmt, create=True)
    if fmt is None:
        raise UsageError("the format of a new image is needed (-f)")
    spec = FORMATS[fmt]
    if spec.create is None:
        raise UsageError(f"{fmt} images cannot be created")
    opts = _options.parse(spec.create_options, dict(options or {}), fmt)
    if backing is not None and not spec.backing:
        raise UsageError(f"{fmt} images have no backing file")
    if os.path.lexists(path):
        raise UsageError(f"{path}: already exists")
    backing_disk = None
    try:
        if backing is not None:
            ctx = new_context(path, policy)
            backing_disk = ctx.open_backing(path, fmt, backing, backing_fmt,
                                            "backing file")
            if size is None:
                size = backing_disk.size
            backing = Backing(backing, backing_fmt or
                              backing_disk.format_name,
                              probe(backing_disk.path) or "raw",
                              backing_disk)
        if size is None:
            raise UsageError("a size is needed (or a backing file)")
        spec.create(path, size, opts, backing)
    finally:
        if backing_disk is not None:
            backing_disk.close()
