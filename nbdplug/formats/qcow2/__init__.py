"""qcow2 (versions 2 and 3), written from qemu's docs/interop/qcow2.txt.

The package splits where the format divides: structs (layouts and
constants), header (parse and validate), mapping (L1/L2), refcount
(counts and allocation), compress, snapshot, disk (the driver), create
and check.
"""

from .disk import Qcow2Disk

__all__ = ["Qcow2Disk"]
