"""nbdplug: VM disk images as block devices, through one driver code path.

The public API: open an image as a Disk (see nbdplug.disk), create one,
and the errors both raise.  Everything here uses the standard library
only, because nbdkit's embedded Python imports it (see serve/plugin.py).
"""

from .disk import EXTENT_HOLE, EXTENT_ZERO, Disk, Extent, HostRange, Run
from .errors import (CorruptImage, ImageError, PolicyError, ReadOnlyDisk,
                     RequestError, UnsupportedFeature, UsageError)
from .formats import FORMATS
from .opener import open_image
from .ops.check import check_image
from .ops.create import create_image
from .policy import OpenPolicy

__all__ = [
    "EXTENT_HOLE", "EXTENT_ZERO", "Disk", "Extent", "HostRange", "Run",
    "CorruptImage", "ImageError", "PolicyError", "ReadOnlyDisk",
    "RequestError", "UnsupportedFeature", "UsageError",
    "FORMATS", "check_image", "create_image", "open_image", "OpenPolicy",
]
