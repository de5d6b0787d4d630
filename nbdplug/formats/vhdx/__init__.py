"""vhdx: Microsoft's VHDX images (fixed, dynamic, differencing), read-only.

    disk.py  headers, region table, metadata, BAT and VhdxDisk
    log.py   the metadata log, replayed in memory when an image needs it
"""

from .disk import VhdxDisk

__all__ = ["VhdxDisk"]
