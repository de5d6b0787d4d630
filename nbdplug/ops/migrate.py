"""`nbdplug migrate`: move a disk to this host while it is in use.

    migrate start SOURCE LOCAL.qcow2 [--rate BYTES/s] [-p] [--no-wait]
    migrate resume LOCAL.qcow2 [--rate BYTES/s] [-p] [--no-wait]
    migrate status LOCAL.qcow2 [--output=json]
    migrate cancel LOCAL.qcow2

start makes LOCAL.qcow2 with the source's size, the source as its backing
file and the record that vouches for it (formats/qcow2/migration.py),
then fills it here until done.  The copy-on-read and the fill live in the
qcow2 driver (formats/qcow2/fill.py): whichever process opens the image
writable (serve, attach, tapbridge, or resume) runs them, so with
--no-wait the disk's consumer fills it.  status reads what that process
last wrote and tries the source.
"""

import json
import os
import signal
import sys
import time

from nbdplug import opener, options as _options
from nbdplug.errors import ImageError, UsageError
from nbdplug.formats import FORMATS, nbd
from nbdplug.formats.qcow2 import fill, migration
from nbdplug.formats.qcow2.header import read_header
from nbdplug.hostfile import HostFile
from nbdplug.opener import open_image

FMT = "qcow2"


def start(source, local, rate=0, progress=False, wait=True,
          create_options=None):
    """Create LOCAL.qcow2 over `source` (an NBD URI or a local image) and,
    when `wait`, fill it until done."""
    if os.path.lexists(local):
        raise UsageError(f"{local}: already exists")
    if nbd.is_uri(source):
        name, fmt = source, "raw"
        with nbd.NbdDisk.open(source,
                              limit=opener.SOURCE_PATIENCE) as disk:
            size = disk.size
    else:
        name = os.path.realpath(source)
        with open_image(source, readonly=True, share=True) as disk:
            size, fmt = disk.size, disk.format_name
    if size % 512:
        raise UsageError(f"{source}: its size ({size}) is not a multiple "
                         "of 512, which a qcow2 image needs")
    spec = FORMATS[FMT]
    opts = _options.parse(spec.create_options, dict(create_options or {}),
                          FMT)
    if opts["extended_l2"] or opts["compat"] != 3:
        raise UsageError("a moving disk is a version 3 qcow2 image "
                         "without extended L2 entries")
    migration.host_key(create=True)
    # Made under a temporary name and renamed when complete, so a crash
    # never leaves a LOCAL.qcow2 that does not read as the source.
    tmp = _temporary(local, os.getpid())
    _remove_stale(local)
    try:
        spec.create(tmp, size, opts, None)
        file = HostFile(tmp, readonly=False)
        try:
            migration.write(file, tmp, name, fmt, rate=rate)
        finally:
            file.close()
        os.link(tmp, local)         # fails rather than replace a file
        _sync_dir(local)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    if wait:
        return resume(local, None, progress)
    return 0


def resume(local, rate=None, progress=False, wait=True):
    """Go on with the move of `local` (after a crash, a cancel or a
    --no-wait start): record `rate` if given and, when `wait`, fill here
    until done."""
    with open_image(local, FMT, readonly=False,
                    options={"fill": False}) as disk:
        if disk.backing is None and \
                (fill.read_status(local) or {}).get("state") == "done":
            return 0            # finished already (a resume after a crash)
        move = _move_of(disk, local)
        if not move.active or (rate is not None and
                               rate != move.record.rate):
            if rate is not None:
                move.record.rate = rate
            migration.set_state(disk.file, disk.geo, migration.FILLING,
                                move.record.rate)
            move.record.state = migration.FILLING
            move.active = True
            move.state = "filling"
        if not wait:
            return 0
        return _follow(move, progress)


def _move_of(disk, local):
    move = getattr(disk, "move", None)
    if move is None or (not move.active and disk.backing is None):
        raise UsageError(f"{local}: no move in progress (it has no "
                         "source this host set up with migrate start)")
    return move


def _follow(move, progress):
    """Run the fill in this process until the move completes; a signal
    stops it (resume goes on from there)."""
    stopped = []

    def on_signal(signum, frame):
        stopped.append(signum)
        move.stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM,
                                                     signal.SIGINT)}
    bar = None
    try:
        move.start(background=False)
        if progress:
            import tqdm     # only here: the plugin path never needs it
            bar = tqdm.tqdm(total=0, unit="B", unit_scale=True,
                            unit_divisor=1024, desc="moving",
                            file=sys.stderr, dynamic_ncols=True)
        while not move.wait(0.2):
            if bar is not None and move.total:
                bar.total = move.total
                bar.update(move.done - bar.n)
            if stopped or not move.thread.is_alive():
                break
        if bar is not None:
            bar.total = move.total
            bar.update(move.done - bar.n)
    finally:
        if bar is not None:
            bar.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    if move.finished.is_set():
        return 0
    if stopped:
        return 128 + stopped[0]
    raise UsageError(f"{move.disk.path}: the move stopped: {move.error}")


def status(local):
    """What the move of `local` is doing: a dict (see status_lines)."""
    file = HostFile(local, readonly=True)
    try:
        geo = read_header(file, local)
    finally:
        file.close()
    record = migration.verified(geo)
    last = fill.read_status(local) or {}
    out = {"image": local, "state": "none", "source": geo.backing_name,
           "done": last.get("done"), "total": last.get("total"),
           "rate": last.get("rate"), "limit": last.get("limit"),
           "eta": last.get("eta"), "fetched": last.get("fetched"),
           "filler": None, "source_reachable": None,
           "error": last.get("error")}
    if record is None:
        if last.get("state") == "done" and geo.backing_name is None:
            out.update(state="done", source=last.get("source"), eta=0)
        return out
    out["state"] = migration.STATES[record.state]
    out["limit"] = record.rate
    pid = last.get("pid")
    if pid and _alive(pid) and last.get("state") != "stopped":
        out["filler"] = pid
        out["state"] = last.get("state", out["state"])
    out["source_reachable"] = _reachable(geo.backing_name)
    return out


def status_lines(st):
    def size(n):
        return "?" if n is None else _human(n)
    lines = [f"image: {st['image']}", f"state: {st['state']}",
             f"source: {st['source']}"]
    if st["total"] is not None:
        pct = 100 * (st["done"] or 0) / st["total"] if st["total"] else 100
        lines.append(f"done: {size(st['done'])} of {size(st['total'])} "
                     f"({pct:.1f}%)")
    if st["rate"] is not None:
        limit = f" (limit {_human(st['limit'])}/s)" if st["limit"] else ""
        lines.append(f"rate: {size(st['rate'])}/s{limit}")
    if st["eta"] is not None:
        lines.append(f"eta: {int(st['eta'])} s")
    if st["fetched"] is not None:
        lines.append(f"fetched from source: {size(st['fetched'])}")
    if st["filler"]:
        lines.append(f"filled by: pid {st['filler']}")
    if st["source_reachable"] is not None:
        lines.append("source reachable: " + ("yes" if st["source_reachable"]
                                             else "no"))
    if st["error"] and st["state"] != "done":
        lines.append(f"last error: {st['error']}")
    return lines


def cancel(local, timeout=30.0):
    """Stop the move of `local`: a `migrate` process filling it here is
    stopped; the image stays backed by the source, consistent, and is
    filled no more until `migrate resume`."""
    last = fill.read_status(local) or {}
    pid = last.get("pid")
    if pid and _alive(pid) and _is_migrate(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        disk = open_image(local, FMT, readonly=False, options={"fill": False})
    except ImageError as e:
        raise UsageError(f"{local}: cannot cancel while another process "
                         f"has it open ({e.reason}); stop it first") \
            from None
    with disk:
        move = _move_of(disk, local)
        migration.set_state(disk.file, disk.geo, migration.CANCELLED,
                            move.record.rate)
        move.record.state = migration.CANCELLED
        move.active, move.state = False, "cancelled"
        move._report(force=True)


def _temporary(local, pid):
    return os.path.join(os.path.dirname(os.path.abspath(local)),
                        f".{os.path.basename(local)}.{pid}.new")


def _remove_stale(local):
    """Temporary images of starts that were killed before their rename."""
    d = os.path.dirname(os.path.abspath(local))
    head = f".{os.path.basename(local)}."
    for name in os.listdir(d):
        pid = name[len(head):-len(".new")]
        if name.startswith(head) and name.endswith(".new") and \
                pid.isdigit() and not _alive(int(pid)):
            os.unlink(os.path.join(d, name))


def _reachable(name):
    if not nbd.is_uri(name):
        return os.path.exists(name)
    try:
        with nbd.NbdDisk.open(name, limit=opener.SOURCE_PATIENCE):
            return True
    except ImageError:
        return False


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _is_migrate(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"migrate" in argv


def _sync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def to_json(st):
    return json.dumps(st, indent=4)
