"""Hostile-image harness shared by every format's tests.

assert_rejected() opens a crafted image in a child process with its
address space capped at 256 MiB and a deadline, read-only through
`nbdplug info` and read-write through open_image, and asserts: one clear
ImageError line naming the file, exit status 2, no traceback, no hang,
and the file's bytes and mtime unchanged.
"""

import hashlib
import os
import resource
import subprocess
import sys

from conftest import REPO

MEMORY_LIMIT = 256 << 20
DEADLINE = 30

_OPEN_RW = """
import sys
sys.path.insert(0, {repo!r})
from nbdplug import ImageError, open_image
try:
    disk = open_image(sys.argv[1], sys.argv[2], readonly=False)
    buf = bytearray(min(disk.size, 1 << 20))
    disk.pread(memoryview(buf), 0)
    disk.close()
except ImageError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
print("opened", file=sys.stderr)
sys.exit(0)
"""


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _fingerprint(path):
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return digest, os.stat(path).st_mtime_ns


def _run(argv):
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                          timeout=DEADLINE, preexec_fn=_limit)


def assert_rejected(path, fmt, match, writable=True, extra_files=(),
                    readonly=True):
    """The image at `path` must be refused with a message containing
    `match`, read-only (`nbdplug info`) and read-write (open_image), with
    nothing written.  `readonly=False` skips the read-only attempt, for
    damage that only matters to a writer (e.g. refcount structures)."""
    path = str(path)
    watched = [path] + [str(p) for p in extra_files]
    before = [_fingerprint(p) for p in watched]
    attempts = []
    if readonly:
        attempts.append([sys.executable, "-m", "nbdplug.cli", "info",
                         "-f", fmt, path])
    if writable:
        attempts.append([sys.executable, "-c", _OPEN_RW.format(repo=REPO),
                         path, fmt])
    for argv in attempts:
        proc = _run(argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (argv[-3:], proc.returncode,
                                      proc.stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in proc.stderr, \
            proc.stderr[-2000:]
        assert os.path.basename(path) in lines[0], lines[0]
        assert match.lower() in lines[0].lower(), lines[0]
    after = [_fingerprint(p) for p in watched]
    assert after == before, "a hostile image was modified"
