"""The image formats: FORMATS is the one table of drivers, keyed by
qemu-img's format names; the CLI's -f choices come from it."""

from .qcow import QcowDisk
from .qcow2 import Qcow2Disk
from .ram import RamDisk
from .raw import RawDisk
from .vhd import VhdDisk
from .vhdx import VhdxDisk
from .vmdk import VmdkDisk

FORMATS = {
    "raw": RawDisk,
    "qcow2": Qcow2Disk,
    "qcow": QcowDisk,
    "vmdk": VmdkDisk,
    "vpc": VhdDisk,
    "vhdx": VhdxDisk,
    "ram": RamDisk,
}
