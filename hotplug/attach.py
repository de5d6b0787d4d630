"""Attach an image as a block device, and detach it again.

    image --nbdkit + our plugin on a Unix socket--> /dev/nbdN (kernel NBD)
                                                or  nbdfuse file -> /dev/loopN
    then every partition gets a device (partitions.py)

Each step is recorded before and after it is taken (state.py), and any
failure undoes what the record holds, so an attach either completes or
leaves nothing.  teardown() is the one way out: used by detach, by a
failed attach, and for attachments whose server died.
"""

import os
import subprocess
import time

from nbdplug.serve import nbdkit as server
from nbdplug.errors import UsageError
from nbdplug.opener import names_a_file, open_image

from . import VIA, devices, partitions, procs, state
from .udev import Watcher



def attach(image, fmt=None, readonly=False, share=False, via=None,
           policy=None):
    """Attach `image`; returns its record (see state.py)."""
    if via not in (None,) + VIA:
        raise UsageError(f"--via {via!r}: expected nbd or loop")
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
        if via is None:
            via = "nbd" if devices.nbd_available() else "loop"
        elif via == "nbd" and not devices.nbd_available():
            raise UsageError("this kernel has no NBD (modprobe nbd failed)")
        record = {"image": image, "format": fmt, "readonly": readonly,
                  "force_share": share, "via": via, "dir": state.new_dir(image),
                  "created": time.time(), "mounts": [], "partitions": []}
        try:
            _build(record, policy)
        except BaseException:
            teardown(record)
            raise
    return record


def _build(record, policy):
    save = state.save
    save(record)
    d = record["dir"]
    sock = os.path.join(d, "nbd.sock")
    pidfile = sock + ".pid"
    argv = ["nbdkit", "-U", sock, "-P", pidfile]
    if record["readonly"]:
        argv.append("-r")
    argv += server.plugin_args(
        record["image"], record["format"], readonly=record["readonly"],
        share=record["force_share"],
        backing_roots=policy.roots if policy else (),
        no_backing=policy.no_backing if policy else False)
    pid = server.start_background(argv, pidfile)
    record.update(socket=sock, server_pid=pid,
                  server_start=procs.start_time(pid))
    save(record)
    watcher = Watcher()         # before any device exists: no lost events
    if record["via"] == "nbd":
        taken = {r.get("device") for r in state.load_all()}
        record["device"] = devices.nbd_connect(sock, record["readonly"],
                                               taken)
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
    if dev and record["via"] == "nbd":
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
    return [record.get("device")] + [p.get("device") for p in
                                     record.get("partitions", [])]


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
