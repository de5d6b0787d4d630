"""nbdplug: VM disk images as block devices, through one driver code path.

The public API: open an image as a Disk (see nbdplug.disk), create one,
and the errors both raise.  Everything here uses the standard library
only, because nbdkit's embedded Python imports it (see plugin.py).
"""

from .disk import HOLE, ZERO, Disk, Extent, HostRange, Run
from .errors import (CorruptImage, ImageError, PolicyError, ReadOnlyDisk,
                     RequestError, UnsupportedFeature, UsageError)
from .opener import FORMATS, check_image, create_image, open_image
from .policy import OpenPolicy

__all__ = [
    "HOLE", "ZERO", "Disk", "Extent", "HostRange", "Run",
    "CorruptImage", "ImageError", "PolicyError", "ReadOnlyDisk",
    "RequestError", "UnsupportedFeature", "UsageError",
    "FORMATS", "check_image", "create_image", "open_image", "OpenPolicy",
]
