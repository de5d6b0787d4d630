"""What is attached, recorded where every nbdplug command can see it.

Each attachment has a directory under the run directory (/run/nbdplug, or
$NBDPLUG_RUN_DIR) holding its server's socket and pidfile, the nbdfuse
mountpoint when there is one, and state.json, the record of every kernel
object made for it.  The record is written before each object is made and
after, durably (temp file, fsync, rename, fsync of the directory), so a
crash of the attaching process leaves a record from which detach can undo
whatever exists.  One lock file serialises the commands that change state.
"""

import contextlib
import fcntl
import json
import os
import re
import tempfile

RECORD = "state.json"


def run_dir():
    path = os.environ.get("NBDPLUG_RUN_DIR", "/run/nbdplug")
    os.makedirs(path, mode=0o755, exist_ok=True)
    return path


@contextlib.contextmanager
def locked():
    """Hold the run directory's lock (attach, detach and cleanup)."""
    fd = os.open(os.path.join(run_dir(), ".lock"),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def new_dir(image):
    """A fresh directory for one attachment (short: socket paths are
    limited to 108 bytes)."""
    base = re.sub(r"[^\w.-]", "_", os.path.basename(image))[:24] or "image"
    return tempfile.mkdtemp(prefix=base + ".", dir=run_dir())


def save(record):
    """Write `record` (a dict with "dir") durably."""
    d = record["dir"]
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(d, RECORD))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_all():
    """Every recorded attachment, oldest first."""
    out = []
    for name in sorted(os.listdir(run_dir())):
        path = os.path.join(run_dir(), name, RECORD)
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue        # not ours (nbdplug serve), or half-made
    return sorted(out, key=lambda r: r.get("created", 0))


def remove(record):
    """Forget an attachment whose objects are all gone."""
    d = record["dir"]
    for name in os.listdir(d):
        path = os.path.join(d, name)
        if os.path.isdir(path):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        elif name != RECORD:
            with contextlib.suppress(OSError):
                os.unlink(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(d, RECORD))  # the record goes last
    with contextlib.suppress(OSError):
        os.rmdir(d)
