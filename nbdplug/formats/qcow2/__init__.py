"""qcow2 (versions 2 and 3), written from qemu's docs/interop/qcow2.txt.

The package splits where the format divides: structs (layouts and
constants), tables (reading them), header (parse and validate), mapping
(L1/L2), refcount (counts and allocation), overlap (what a write must not
land on), compress, snapshot, bitmaps, disk (the driver), create, check,
resize and rebase.
"""

from nbdplug.disk import FormatSpec

from . import check, create, rebase, resize
from .disk import Qcow2Disk

SPEC = FormatSpec("qcow2", open=Qcow2Disk.open, probe=Qcow2Disk.probe,
                  create=create.create, create_options=create.OPTIONS,
                  backing=True, backing_format=True, check=check.check,
                  resize=resize.resize, rebase=rebase.rebase, compress=True)

__all__ = ["Qcow2Disk", "SPEC"]
