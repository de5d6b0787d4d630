"""Helpers for the migrate tests: a source that can go away and come
back on the same socket, source images with data, holes and zeros, and
the model a moving disk must read as (the source overlaid with the
guest's writes)."""

import os
import random
import subprocess
import tempfile

from conftest import pattern, run
from nbdplug.serve import nbdkit as server

MiB = 1 << 20


def source_raw(path, size=24 * MiB, seed=0):
    """A raw source: patterned data in pieces (some not cluster aligned),
    holes, and a run of written zeros; its bytes."""
    model = bytearray(size)
    rng = random.Random(seed)
    pieces = [(0, 256 * 1024), (3 * MiB + 4096, MiB + 512),
              (9 * MiB, 2 * MiB), (size - 3 * MiB - 65536, 700 * 1024)]
    pieces += [(off, MiB) for off in range(24 * MiB, size - 4 * MiB,
                                           4 * MiB)]
    pieces += [(rng.randrange(0, size - 65536) // 512 * 512,
                rng.randrange(1, 128) * 512) for _ in range(12)]
    for i, (off, n) in enumerate(pieces):
        model[off:off + n] = pattern(n, i + seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in pieces:
            f.seek(off)
            f.write(model[off:off + n])
        f.seek(15 * MiB)                    # data that reads as zeros
        f.write(bytes(MiB))
    model[15 * MiB:16 * MiB] = bytes(MiB)
    return model


def source_image(tmp, fmt, size=24 * MiB, seed=0):
    """A source image of `fmt` (raw, qcow2, vmdk) and its bytes."""
    raw = os.path.join(tmp, f"source-{seed}.raw")
    model = source_raw(raw, size, seed)
    if fmt == "raw":
        return raw, model
    path = os.path.join(tmp, f"source-{seed}.{fmt}")
    run(["qemu-img", "convert", "-f", "raw", "-O", fmt, raw, path])
    return path, model


class SourceServer:
    """nbdkit with our plugin serving `image` read-only on a socket that
    stays the same across stop() and start()."""

    def __init__(self, image, fmt=None):
        self.image, self.fmt = image, fmt
        self.dir = tempfile.mkdtemp(prefix="nbdplug-src.")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.pidfile = self.sock + ".pid"
        self.uri = server.unix_uri(self.sock)
        self.running = False

    def start(self):
        argv = ["nbdkit", "-r", "-U", self.sock, "-P", self.pidfile]
        argv += server.plugin_args(self.image, self.fmt, readonly=True)
        server.start_background(argv, self.pidfile)
        self.running = True

    def stop(self):
        if self.running:
            server.stop(self.pidfile)
            self.running = False

    def kill(self):
        """kill -9, as a crash of the source host's server."""
        with open(self.pidfile) as f:
            pid = int(f.read())
        os.kill(pid, 9)
        self.running = False
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            subprocess.run(["sleep", "0.02"])
        for path in (self.sock, self.pidfile):
            if os.path.exists(path):
                os.unlink(path)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        os.rmdir(self.dir) if not os.listdir(self.dir) else None


def guest_writes(model, rng, count, size):
    """Random guest writes (offset, data) of 512 B to 192 KiB, each
    applied to `model` as it is yielded; some land in missing clusters,
    some straddle clusters."""
    for _ in range(count):
        n = rng.choice((512, 4096, 65536, 3 * 65536)) \
            if rng.random() < 0.7 else rng.randrange(1, 300) * 512
        off = rng.randrange(0, size - n) // 512 * 512
        data = bytes([rng.randrange(1, 256)]) * n
        model[off:off + n] = data
        yield off, data
