"""Attach an image as a block device, and detach it again.

    image --nbdkit + our plugin on a Unix socket--> /dev/nbdN (kernel NBD)
                                                or  nbdfuse file -> /dev/loopN
          (fast: /dev/nbdN and a loop device of each host file under
           device-mapper, /dev/mapper/nbdplug-*; see fast.py)
    then every partition gets a device (partitions.py)

Each step is recorded before and after it is taken (state.py), and any
failure undoes what the record holds, so an attach either completes or
leaves nothing.  teardown() is the one way out: used by detach, by a
failed attach, and for attachments whose server died.
"""

import contextlib
import os
import subprocess
import time

from nbdplug.serve import nbdkit as server
from nbdplug.errors import UsageError
from nbdplug.opener import names_a_file, open_image

from . import VIA, devices, fast, partitions, procs, state
from .udev import Watcher


def attach(image, fmt=None, readonly=False, share=False, via=None,
           policy=None):
    """Attach `image`; returns its record (see state.py).  `via` None is
    fast where the kernel has NBD and device-mapper, else nbd or loop."""
    if via not in (None,) + VIA:
        raise UsageError(f"--via {via!r}: expected " + ", ".join(VIA))
    if names_a_file(image):
        image = os.path.realpath(image)
    with state.locked():
        for other in state.load_all():
            if other["image"] != image:
                continue
            if not alive(other):
                teardown(other)
            elif not readonly or not (other["readonly"] or share):
                raise UsageError(
                    f"{image}: already attached as {other.get('device')} "
                    f"({'read-only' if other['readonly'] else 'read-write'}"
                    f"); detach it first")
        # Open here first: a bad image or a lock held by another process
        # is one clear line, before any server or device exists.
        with open_image(image, fmt, readonly=readonly, policy=policy,
                        share=share) as disk:
            fmt = disk.format_name
            files = disk.files()
            why_not = fast.unavailable(disk) if via in (None, "fast") \
                else None
        if why_not:
            via = None
        elif via is None:
            via = "fast"
        if via is None:
            via = "nbd" if devices.nbd_available() else "loop"
        elif via == "nbd" and not devices.nbd_available():
            raise UsageError("this kernel has no NBD (modprobe nbd failed)")
        record = {"image": image, "format": fmt, "readonly": readonly,
                  "force_share": share, "via": via, "dir": state.new_dir(image),
                  "created": time.time(), "mounts": [], "partitions": []}
        if why_not:
            record["fast_unavailable"] = why_not
        if via == "fast":
            record.update(files=files, control=os.path.join(
                record["dir"], "dm.sock"), dm_name="nbdplug-" +
                os.path.basename(record["dir"]))
        try:
            _build(record, policy)
        except BaseException:
            teardown(record)
            raise
    return record


def _build(record, policy):
    save = state.save
    save(record)
    record["policy"] = {"roots": list(policy.roots) if policy else [],
                        "no_backing": policy.no_backing if policy else False}
    start_server(record)
    sock = record["socket"]
    d = record["dir"]
    watcher = Watcher()         # before any device exists: no lost events
    if record["via"] == "fast":
        record["nbd"] = devices.nbd_connect(sock, record["readonly"],
                                            fast.taken_nbd())
        save(record)
        fast.make_loops(record, save)
        fast.make_device(record)
        save(record)
    elif record["via"] == "nbd":
        record["device"] = devices.nbd_connect(sock, record["readonly"],
                                               fast.taken_nbd())
        save(record)
    else:
        fuse = os.path.join(d, "fuse")
        record["fuse_dir"] = fuse
        save(record)
        fpid, fstart = devices.fuse_start(sock, fuse, record["readonly"])
        record.update(fuse_pid=fpid, fuse_start=fstart)
        save(record)
        record["device"] = devices.loop_attach(os.path.join(fuse, "disk"),
                                               record["readonly"])
        save(record)
    partitions.map_partitions(record, save, watcher)
    save(record)


def start_server(record):
    """Start the attachment's nbdkit (again, for restart) and record it."""
    sock = os.path.join(record["dir"], "nbd.sock")
    pidfile = sock + ".pid"
    for stale in (sock, record.get("control")):
        if stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
    argv = ["nbdkit", "-U", sock, "-P", pidfile]
    if record["readonly"]:
        argv.append("-r")
    policy = record["policy"]
    args = server.plugin_args(
        record["image"], record["format"], readonly=record["readonly"],
        share=record["force_share"], backing_roots=policy["roots"],
        no_backing=policy["no_backing"])
    if record["via"] == "fast":
        args = fast.server_args(args, record)
    pid = server.start_background(argv + args, pidfile)
    record.update(socket=sock, server_pid=pid,
                  server_start=procs.start_time(pid))
    state.save(record)


def alive(record):
    """Is the attachment's server (and nbdfuse, if any) still running?"""
    ok = procs.alive(record.get("server_pid"), record.get("server_start"))
    if record.get("fuse_pid"):
        ok = ok and procs.alive(record["fuse_pid"], record.get("fuse_start"))
    return ok


def teardown(record):
    """Undo everything the record holds, last made first, then forget it.
    Safe on a half-made record and on one whose processes died."""
    for mnt in reversed(record.get("mounts", [])):
        unmount(mnt)
    partitions.unmap_partitions(record)
    dev = record.get("device")
    if record["via"] == "fast":
        fast.remove_device(record, alive(record))
        if record.get("nbd"):
            devices.nbd_disconnect(record["nbd"])
        fast.remove_loops(record)
    elif dev and record["via"] == "nbd":
        devices.nbd_disconnect(dev)
    elif dev:
        devices.drop_partitions(dev)
        devices.loop_detach(dev)
    if record.get("fuse_dir"):
        devices.fuse_stop(record["fuse_dir"], record.get("fuse_pid"),
                          record.get("fuse_start"))
    # SIGTERM: nbdkit flushes and closes the image (dropping its locks).
    procs.stop(record.get("server_pid"), record.get("server_start"))
    state.remove(record)


def unmount(path):
    if devices.mounted(path):
        if subprocess.run(["umount", path], capture_output=True).returncode:
            # A dead server's filesystem may refuse a clean unmount.
            subprocess.run(["umount", "-l", path], capture_output=True)


def devices_of(record):
    return [record.get("device"), record.get("nbd")] + \
        [p.get("device") for p in record.get("partitions", [])]


def find(target):
    """Records matching a device, a partition device, an image path or a
    mountpoint."""
    real = os.path.realpath(target)
    out = []
    for r in state.load_all():
        if real in devices_of(r) or target in devices_of(r) or \
                r["image"] in (real, target) or real in r.get("mounts", []):
            out.append(r)
    return out


def restart(target):
    """Replace the server of a fast attachment (upgrade, or recovery after
    it was killed) while its device stays, mounted or not."""
    with state.locked():
        records = find(target)
        if not records:
            raise UsageError(f"{target}: not attached by nbdplug")
        for r in records:
            if r["via"] != "fast":
                raise UsageError(f"{target}: attached via {r['via']}; only "
                                 "a fast device outlives its server")
            fast.restart(r, start_server, alive(r))
    return records


def detach(target=None, everything=False):
    """Detach one attachment (DEV|IMAGE), or all of them; returns the
    records detached."""
    with state.locked():
        if everything:
            records = state.load_all()
        else:
            records = find(target)
            if not records:
                raise UsageError(f"{target}: not attached by nbdplug")
            for r in records:
                if r.get("mounts") and alive(r):
                    raise UsageError(f"{target}: mounted on "
                                     f"{', '.join(r['mounts'])}; "
                                     "nbdplug umount it first")
        for r in records:
            teardown(r)
    return records
