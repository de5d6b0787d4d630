"""`nbdplug check`: a format's own consistency check, as qemu-img's."""

from nbdplug.errors import UnsupportedFeature
from nbdplug.formats import FORMATS
from nbdplug.opener import (check_format, check_openable, image_name,
                            new_context, probe)


class CheckUnsupported(UnsupportedFeature):
    """The format has no check (qemu-img check exits 63 for it)."""


def check_image(path, format=None, repair=None, policy=None):
    """Check (and with repair='leaks'|'all', repair) one image's own
    metadata; returns a report.CheckReport.  Raises CheckUnsupported for
    formats without a check, ImageError for an image it cannot open."""
    check_format(format)
    path, format = image_name(path, format)
    check_openable(path)
    fmt = format or probe(path) or "raw"
    spec = FORMATS[fmt]
    if spec.check is None:
        raise CheckUnsupported(path, fmt,
                               "this image format does not support checks")
    try:
        return spec.check(path, new_context(path, policy), repair)
    except UnsupportedFeature as e:
        if e.field == "repair":         # checks, but cannot repair
            raise CheckUnsupported(e.path, e.fmt, e.reason) from None
        raise
