"""vhdx: Microsoft's VHDX images (fixed, dynamic, differencing), read-only.

    disk.py  headers, region table, metadata, BAT and VhdxDisk
    log.py   the metadata log, replayed in memory when an image needs it
"""

from nbdplug.disk import FormatSpec

from .disk import VhdxDisk

SPEC = FormatSpec("vhdx", open=VhdxDisk.open, probe=VhdxDisk.probe,
                  writable=False)

__all__ = ["VhdxDisk", "SPEC"]
