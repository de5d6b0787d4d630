"""VMDK: VMware virtual disks, read and written (Virtual Disk Format 1.1).

    descriptor.py  the text descriptor, parsed within bounds and written
    structs.py     the sparse extent header and stream markers
    extent.py      what every extent offers the driver
    sparse.py      hosted sparse extents: grain directory and tables,
                   compressed grains, the stream-optimized footer
    flat.py        FLAT, VMFS and ZERO extents
    create.py      new images of every subformat
    rebase.py      pointing a delta disk at another parent
    driver.py      VmdkDisk: descriptor, extents and parent as one Disk
"""

from nbdplug.disk import FormatSpec

from . import create, rebase
from .driver import VmdkDisk

SPEC = FormatSpec("vmdk", open=VmdkDisk.open, probe=VmdkDisk.probe,
                  create=create.create, create_options=create.OPTIONS,
                  backing=True, check=VmdkDisk.check, rebase=rebase.rebase,
                  compress=True)

__all__ = ["VmdkDisk", "SPEC"]
