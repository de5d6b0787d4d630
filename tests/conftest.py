"""Fixtures shared by the suites: real nbdkit serving the real plugin,
and typed wrappers around the reference tools (qemu-img, qemu-io)."""

import contextlib
import json
import os
import subprocess
import sys
import tempfile


from nbdplug.serve import nbdkit as server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NBDPLUG = [sys.executable, "-m", "nbdplug.cli"]


def run(argv, check=True, **kw):
    """Run a command; on failure show its stderr in the assertion."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    proc = subprocess.run(argv, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def nbdplug(*args, check=True, **kw):
    return run(NBDPLUG + [str(a) for a in args], check=check, cwd=REPO, **kw)


def qemu_io(image, fmt, *commands):
    """Run qemu-io's commands (-c each) on `image`."""
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    return run(argv + [str(image)])


def pattern(length, seed):
    """Bytes that say where they came from (offset-dependent)."""
    return bytes((seed + i // 512) % 251 + 1 for i in range(length))


def sparse_raw(path, size, pieces=()):
    """A raw file of `size` bytes, holes but for `pieces` [(offset,
    data)]; its name."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return str(path)


def qemu_img_info(image, *args):
    """`qemu-img info --output=json` as a dict."""
    return json.loads(run(["qemu-img", "info", "--output=json", *args,
                           str(image)]).stdout)


class ContentMismatch(AssertionError):
    pass


def qemu_img_check_clean(image):
    """Assert `qemu-img check` finds no corruption, leak or error."""
    proc = run(["qemu-img", "check", "--output=json", str(image)],
               check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    for key in ("corruptions", "leaks", "check-errors"):
        assert report.get(key, 0) == 0, (key, report)


def qemu_img_compare(a, b, fmt_a=None, fmt_b=None):
    """Assert `qemu-img compare` finds the two images identical."""
    # -U: either side may be an image a running server holds read-write.
    argv = ["qemu-img", "compare", "-q", "-U"]
    if fmt_a:
        argv += ["-f", fmt_a]
    if fmt_b:
        argv += ["-F", fmt_b]
    proc = run(argv + [a, b], check=False)
    if proc.returncode == 1:
        raise ContentMismatch(f"{a} and {b} differ: {proc.stdout}")
    if proc.returncode != 0:
        raise AssertionError(f"qemu-img compare failed: {proc.stderr}")


class Served:
    """A running server: its URI, and libnbd handles closed before it
    stops (nbdkit waits for connected clients before exiting)."""

    def __init__(self, uri):
        self.uri = uri
        self.handles = []

    def __str__(self):
        return self.uri

    def connect(self, strict=True):
        import nbd
        h = nbd.NBD()
        if not strict:              # let bad requests reach the server
            h.set_strict_mode(0)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(self.uri)
        self.handles.append(h)
        return h

    def close_clients(self):
        for h in self.handles:
            with contextlib.suppress(Exception):
                h.shutdown()

        self.handles.clear()


@contextlib.contextmanager
def served(image, fmt=None, readonly=False, extra=(), nbdkit_args=()):
    """Serve `image` with nbdkit + our plugin on a Unix socket; yield a
    Served; stop the server (SIGTERM, so it flushes) afterwards."""
    sockdir = tempfile.mkdtemp(prefix="nbdplug-test.")   # short: sun_path
    sock = os.path.join(sockdir, "nbd.sock")
    pidfile = sock + ".pid"
    argv = ["nbdkit", "-U", sock, "-P", pidfile, *nbdkit_args]
    if readonly:
        argv.append("-r")
    argv += server.plugin_args(image, fmt, readonly=readonly) + list(extra)
    server.start_background(argv, pidfile)
    srv = Served(server.unix_uri(sock))
    try:
        yield srv
    finally:
        srv.close_clients()
        server.stop(pidfile)
        with contextlib.suppress(OSError):
            os.rmdir(sockdir)
