"""Starting and stopping nbdkit with the nbdplug plugin.

One place builds the nbdkit command line, so `nbdplug serve`, attach and
the tests all serve images the same way.
"""

import contextlib
import ipaddress
import os
import signal
import subprocess
import tempfile
import time
import urllib.parse

from .errors import UsageError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.join(PACKAGE_DIR, "plugin.py")
RUN_DIR = os.environ.get("NBDPLUG_RUN_DIR", "/run/nbdplug")


def plugin_args(image, fmt=None, readonly=False, direct=False,
                backing_roots=(), no_backing=False, share=False):
    """The `python PLUGIN key=value...` part of an nbdkit command line."""
    args = ["python", PLUGIN, f"file={os.path.abspath(image)}"]
    if fmt:
        args.append(f"format={fmt}")
    if readonly:
        args.append("readonly=true")
    if direct:
        args.append("direct=true")
    if no_backing:
        args.append("no-backing=true")
    if share:
        args.append("force-share=true")
    args += [f"backing-root={os.path.abspath(r)}" for r in backing_roots]
    return args


def nbdkit_env():
    """nbdkit's embedded Python must find this package (plugin.py also
    inserts it; PYTHONPATH covers plugins run from a copy)."""
    env = dict(os.environ)
    root = os.path.dirname(PACKAGE_DIR)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"]
                                if env.get("PYTHONPATH") else "")
    return env


def unix_uri(socket_path):
    return "nbd+unix:///?socket=" + urllib.parse.quote(socket_path, safe="/")


def tcp_uri(host, port):
    if ":" in host:
        host = f"[{host}]"
    return f"nbd://{host}:{port}/"


def parse_listen(text):
    """HOST:PORT (IPv6 as [ADDR]:PORT) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT")
    host = host.strip("[]")
    if not host:
        raise UsageError(f"--listen {text!r}: a host address is needed")
    return host, int(port)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_socket_path(image):
    """A fresh socket path under RUN_DIR for serving `image`."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    base = os.path.basename(image) or "image"
    d = tempfile.mkdtemp(prefix=base + ".", dir=RUN_DIR)
    return os.path.join(d, "nbd.sock")


def pidfile_for(socket_path=None, host=None, port=None):
    if socket_path:
        return socket_path + ".pid"
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    return os.path.join(RUN_DIR, f"tcp-{host}-{port}.pid")


def listen_args(socket_path=None, host=None, port=None):
    if socket_path:
        return ["-U", socket_path]
    return ["-i", host, "-p", str(port)]


def stop(pidfile, timeout=5.0):
    """SIGTERM the server recorded in `pidfile` (nbdkit flushes and
    closes the image on the way out), wait for it, remove its files."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as e:
        raise UsageError(f"{pidfile}: no running server recorded ({e})")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    os.unlink(pidfile)
    if pidfile.endswith(".sock.pid"):
        sock = pidfile[:-len(".pid")]
        for path in (sock,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        parent = os.path.dirname(sock)
        if os.path.dirname(parent) == RUN_DIR.rstrip("/"):
            try:
                os.rmdir(parent)
            except OSError:
                pass
    return pid


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start_background(argv, pidfile, timeout=30.0):
    """Run nbdkit, which binds its socket and forks; the child writes
    `pidfile` when it serves, so wait for that rather than the parent."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    proc = subprocess.run(argv, env=nbdkit_env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise UsageError("nbdkit failed: " + (lines[-1] if lines else
                                              f"exit {proc.returncode}"))
    return wait_pidfile(pidfile, timeout)


def wait_pidfile(pidfile, timeout=30.0, child=None):
    """The pid nbdkit writes (with a newline) once it is serving."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            with open(pidfile) as f:
                text = f.read()
            if text.endswith("\n"):
                return int(text)
        if child is not None and child.poll() is not None:
            raise UsageError(f"nbdkit exited with status {child.returncode}"
                             " before serving")
        if time.monotonic() > deadline:
            raise UsageError(f"nbdkit did not start serving within "
                             f"{timeout:g}s")
        time.sleep(0.005)


def run_foreground(argv, pidfile, uri):
    """Run nbdkit as our child; print `uri` once it serves (it writes the
    pidfile after binding); pass SIGTERM/SIGINT on; return its status."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    proc = subprocess.Popen(argv + ["-f"], env=nbdkit_env(),
                            stdin=subprocess.DEVNULL)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    wait_pidfile(pidfile, child=proc)
    print(uri, flush=True)
    status = proc.wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    return 0 if status in (0, -signal.SIGTERM, -signal.SIGINT) else 1
