"""The image formats.  FORMATS is the one table: each format's
FormatSpec (see nbdplug.disk), keyed by qemu-img's format name; the
opener, the operations and the CLI's -f choices all read it.

A format never imports the opener, the operations, the servers or the
CLI: it receives what it needs (an OpenContext, an opened backing Disk).
"""

from . import qcow, qcow2, ram, raw, vhd, vhdx, vmdk

FORMATS = {spec.name: spec for spec in (
    raw.SPEC, qcow2.SPEC, qcow.SPEC, vmdk.SPEC, vhd.SPEC, vhdx.SPEC,
    ram.SPEC)}
