"""`nbdplug check`: a format's own consistency check, as qemu-img's."""

from nbdplug.errors import UnsupportedFeature
from nbdplug.formats import FORMATS
from nbdplug.opener import (check_format, check_openable, image_name,
                            new_context, probe)


def check_image(path, format=None, repair=None, policy=None):
    """Check (and with repair='leaks'|'all', repair) one image's own
    metadata; returns a report.CheckReport.  Raises UnsupportedFeature for
    formats without a check."""
    check_format(format)
    path, format = image_name(path, format)
    check_openable(path)
    fmt = format or probe(path) or "raw"
    spec = FORMATS[fmt]
    if spec.check is None:
        raise UnsupportedFeature(path, fmt,
                                 "this image format does not support checks")
    return spec.check(path, new_context(path, policy), repair)
