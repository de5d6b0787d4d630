"""VMDK: VMware virtual disks, read and written (Virtual Disk Format 1.1).

    descriptor.py  the text descriptor, parsed within bounds and written
    structs.py     the sparse extent header and stream markers
    extent.py      what every extent offers the driver
    sparse.py      hosted sparse extents: grain directory and tables,
                   compressed grains, the stream-optimized footer
    flat.py        FLAT, VMFS and ZERO extents
    create.py      new images of every subformat
    driver.py      VmdkDisk: descriptor, extents and parent as one Disk
"""

from .driver import VmdkDisk

__all__ = ["VmdkDisk"]
