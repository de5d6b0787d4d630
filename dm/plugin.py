"""nbdkit entry of a fast attachment: nbdplug's plugin, with the table
manager (manager.py) beside its request path.

    nbdkit python dm/plugin.py file=IMAGE [format=...] [readonly=true]
        dm-control=SOCKET [dm-targets=N]

Every key but dm-control (the manager's control socket) and dm-targets
(the table's bound, MAX_TARGETS by default) is nbdplug's plugin's.  One
export, the unnamed one.  The write callbacks tell the manager what they
changed after the driver has done it (a deque append); nothing else
here runs in a request.

A flush on the dm device arrives once for every NBD target of the table
(see dm/fast.py): one that follows a flush begun after the last write
has nothing to make durable, and returns at once.
"""

import os
import sys

# As nbdplug/serve/plugin.py: nbdkit does not put our directory on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from nbdplug.serve import plugin as base  # noqa: E402
from nbdplug.serve.plugin import *  # noqa: E402,F401,F403  the callbacks
from nbdplug.errors import UsageError  # noqa: E402

from dm.manager import Manager  # noqa: E402

_settings = {"dm-control": None, "dm-targets": None}
_manager = None


def config(key, value):
    if key == "dm-control":
        _settings[key] = value
    elif key == "dm-targets":
        _settings[key] = int(value)
    else:
        base.config(key, value)


def config_complete():
    base.config_complete()
    if not _settings["dm-control"]:
        raise UsageError("dm-control=SOCKET is required")


def get_ready():
    global _manager
    base.get_ready()
    _manager = Manager(base._exports.opened(), _settings["dm-control"],
                       limit=_settings["dm-targets"])
    _manager.listen()


def after_fork():
    base.after_fork()
    _manager.serve()


def cleanup():
    _manager.close()
    base.cleanup()


# Writes done, and how many of them the last flush began after.
_writes = {"done": 0, "flushed": 0}


def pwrite(h, buf, offset, flags):
    base.pwrite(h, buf, offset, flags)
    _written(offset, len(buf), False)


def trim(h, count, offset, flags):
    base.trim(h, count, offset, flags)
    _written(offset, count, True)


def zero(h, count, offset, flags):
    base.zero(h, count, offset, flags)
    _written(offset, count, True)


def _written(offset, count, frees):
    _writes["done"] += 1
    _manager.note(offset, count, frees)


def flush(h, flags):
    done = _writes["done"]
    if done == _writes["flushed"]:
        return              # durable since a flush that began after it
    base.flush(h, flags)
    _writes["flushed"] = max(_writes["flushed"], done)
