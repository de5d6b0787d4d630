"""The internal snapshot table: listed by `nbdplug info`; a snapshot can
be opened read-only by id or name (its L1 table becomes the active one)."""

import dataclasses

from nbdplug.errors import CorruptImage, UsageError
from . import structs as S
from .tables import read_at

FMT = "qcow2"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int      # None when the entry does not record it (v2)
    icount: int         # None when not recorded
    extra_data_size: int = 0

    def info(self):
        """qemu-img info's keys for a snapshot."""
        out = {"id": self.id, "name": self.name,
               "vm-state-size": self.vm_state_size,
               "date-sec": self.date_sec, "date-nsec": self.date_nsec,
               "vm-clock-sec": self.vm_clock_nsec // 10**9,
               "vm-clock-nsec": self.vm_clock_nsec % 10**9}
        if self.icount is not None:
            out["icount"] = self.icount
        return out


def read_snapshots(file, geo, path):
    """Parse the snapshot table; return the snapshots and the table's
    length in bytes.  As qemu reads it, bytes past the end of the file
    read as zeros (check reports the table lying there)."""
    if not geo.nb_snapshots:
        return [], 0
    out = []
    pos = 0
    for n in range(geo.nb_snapshots):
        e = S.SNAPSHOT_ENTRY.unpack_from(read_at(
            file, S.SNAPSHOT_ENTRY.size, geo.snapshots_offset + pos))
        if e.extra_data_size > S.MAX_SNAPSHOT_EXTRA:
            raise CorruptImage(path, FMT, f"snapshot {n} extra data of "
                               f"{e.extra_data_size} bytes is too large",
                               "snapshot table")
        body = e.extra_data_size + e.id_str_size + e.name_size
        end = pos + S.SNAPSHOT_ENTRY.size + body
        if end > S.MAX_SNAPSHOT_TABLE_BYTES:
            raise CorruptImage(path, FMT, "snapshot table too large",
                               "snapshot table")
        data = bytes(read_at(file, body, geo.snapshots_offset + pos +
                             S.SNAPSHOT_ENTRY.size))
        strings = data[e.extra_data_size:]
        vm_state, disk_size, icount = e.vm_state_size, None, None
        if e.extra_data_size >= S.SNAPSHOT_EXTRA.offset("icount"):
            extra = S.SNAPSHOT_EXTRA.unpack_from(
                data[:e.extra_data_size].ljust(S.SNAPSHOT_EXTRA.size,
                                               b"\xff"))
            vm_state, disk_size = extra.vm_state_size_large, extra.disk_size
            if extra.icount != (1 << 64) - 1:
                icount = extra.icount
        out.append(Snapshot(
            id=strings[:e.id_str_size].decode(errors="replace"),
            name=strings[e.id_str_size:].decode(errors="replace"),
            l1_table_offset=e.l1_table_offset, l1_size=e.l1_size,
            date_sec=e.date_sec, date_nsec=e.date_nsec,
            vm_clock_nsec=e.vm_clock_nsec, vm_state_size=vm_state,
            disk_size=disk_size, icount=icount,
            extra_data_size=e.extra_data_size))
        pos = -(-end // 8) * 8
    return out, pos


def l1_problem(snap, geo, file_size):
    """Why a snapshot's L1 table cannot be used, or None.  Opening the
    image does not ask (qemu opens it too, and its check reports it);
    opening the snapshot, checking and guarding writes do."""
    if snap.l1_table_offset % geo.cluster_size:
        return "L1 table is not cluster aligned"
    if snap.l1_size * 8 > S.MAX_L1_BYTES:
        return "L1 table is too large"
    if snap.l1_table_offset + snap.l1_size * 8 > file_size:
        return "L1 table lies past the end of the file"
    return None


def find(snapshots, key, path):
    """The snapshot whose id, else name, is `key`."""
    for attr in ("id", "name"):
        for snap in snapshots:
            if getattr(snap, attr) == key:
                return snap
    raise UsageError(f"{path}: no snapshot with id or name {key!r}")
