"""Starting and stopping nbdkit with the nbdplug plugin.

One place builds the nbdkit command line, so `nbdplug serve`, attach and
the tests all serve images the same way.  For `serve` it also refuses
what nbdkit would take silently: bad TLS files (tls.py), client
allow-lists that are not addresses, and clear text beyond loopback.
"""

import contextlib
import dataclasses
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

from nbdplug.errors import UsageError
from .exports import Export
from nbdplug.opener import names_a_file, open_image
from .tls import tls_args

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "plugin.py")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(PLUGIN)))
RUN_DIR = os.environ.get("NBDPLUG_RUN_DIR", "/run/nbdplug")

def plugin_args(image, fmt=None, readonly=False, direct=False,
                backing_roots=(), no_backing=False, share=False):
    """The `python PLUGIN key=value...` part of an nbdkit command line
    serving one image as the unnamed export."""
    return exports_plugin_args(
        [Export("", image, fmt, writable=not readonly, share=share)],
        direct, backing_roots, no_backing)


def exports_plugin_args(exports, direct=False, backing_roots=(),
                        no_backing=False):
    """The same for named exports (see plugin.py for the keys)."""
    args = ["python", PLUGIN]
    for e in exports:
        if e.name or len(exports) > 1:
            args.append(f"export={e.name}")
        args.append("file=" + (os.path.abspath(e.image)
                               if names_a_file(e.image) else e.image))
        if e.format:
            args.append(f"format={e.format}")
        if e.writable is False:
            args.append("readonly=true")
        if e.limit:
            args.append(f"limit={e.limit}")
        if e.description:
            args.append(f"description={e.description}")
        if e.snapshot:
            args.append(f"snapshot={e.snapshot}")
        if e.share:
            args.append("force-share=true")
    if direct:
        args.append("direct=true")
    if no_backing:
        args.append("no-backing=true")
    args += [f"backing-root={os.path.abspath(r)}" for r in backing_roots]
    return args


def allow_args(allow):
    """The plugin's allow= key admitting only these client addresses or
    networks (checked here, so a typo is one line before nbdkit runs)."""
    nets = []
    for item in allow:
        try:
            nets.append(str(ipaddress.ip_network(item.strip(),
                                                 strict=False)))
        except ValueError:
            raise UsageError(f"--allow {item!r}: not an IP address or "
                             "network") from None
    return ["allow=" + ",".join(nets)] if nets else []


def serve(cfg, writable=None, policy=None, direct=False, foreground=False,
          pidfile=None):
    """Serve `cfg` (an exports.ServeConfig) with nbdkit; returns the exit
    status.  Every export is opened once here first, so a bad image is
    one clear line rather than an nbdkit log.  `writable` is the default
    for exports that do not say: None means writable on a Unix socket,
    read-only over TCP."""
    if not cfg.exports:
        raise UsageError("nothing to serve: give IMAGE, --export "
                         "NAME=IMAGE or --config FILE")
    names = [e.name for e in cfg.exports]
    for e in cfg.exports:
        if names.count(e.name) > 1:
            raise UsageError(f"export {e.name!r} given twice")
        if e.limit < 0:
            raise UsageError(f"export {e.name!r}: a connection limit of "
                             f"{e.limit}?  (0 is no limit)")
    if cfg.handshake_limit is not None and cfg.handshake_limit < 0:
        raise UsageError(f"a handshake limit of {cfg.handshake_limit} "
                         "seconds?  (0 is no limit)")
    if cfg.socket and cfg.listen:
        raise UsageError("give --socket or --listen, not both")
    tls = tls_args(cfg.tls_psk, cfg.tls_certs, cfg.tls_verify_peer)
    host = port = sock = None
    if cfg.listen:
        host, port = parse_listen(cfg.listen)
        where = tcp_uri(host, port, tls=bool(tls))
        if not tls and not is_loopback(host) and not cfg.insecure:
            raise UsageError(f"refusing to listen on {host} without TLS "
                             "(--tls-psk or --tls-certs); say --insecure "
                             "to serve in clear text")
    else:
        if cfg.allow:
            raise UsageError("--allow filters TCP clients; it needs "
                             "--listen")
        sock = (os.path.abspath(cfg.socket) if cfg.socket
                else new_socket_path(cfg.exports[0].image))
        where = sock
    exports = _opened(cfg.exports, sock is not None if writable is None
                      else writable, policy)
    pidfile = pidfile or pidfile_for(sock, host, port)
    argv = ["nbdkit", "-P", pidfile] + listen_args(sock, host, port) + tls
    if not any(e.writable for e in exports):
        argv.append("-r")
    argv += exports_plugin_args(
        exports, direct, policy.roots if policy else (),
        policy.no_backing if policy else False) + allow_args(cfg.allow)
    if cfg.handshake_limit is not None:
        argv.append(f"handshake-limit={cfg.handshake_limit}")
    uris = [unix_uri(sock, e.name, bool(tls)) if sock
            else tcp_uri(host, port, e.name, bool(tls)) for e in exports]
    try:
        if foreground:
            return run_foreground(argv, pidfile, uris, sock)
        pid = start_background(argv, pidfile)
    except UsageError as e:
        raise UsageError(f"cannot serve on {where}: {e}") from None
    for uri in uris:
        print(uri)
    print(f"pid {pid} (stop with: nbdplug stop {sock or pidfile})")
    return 0


def _opened(exports, writable, policy):
    """Each export with its writability settled and its format named,
    after opening it once the way the plugin will."""
    out = []
    for e in exports:
        e = dataclasses.replace(
            e, writable=writable if e.writable is None else e.writable)
        with open_image(e.image, e.format, readonly=not e.writable,
                        policy=policy, share=e.share) as disk:
            e.format = disk.format_name
        out.append(e)
    return out


def nbdkit_env():
    """nbdkit's embedded Python must find this package (plugin.py also
    inserts it; PYTHONPATH covers plugins run from a copy)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    return env


def unix_uri(socket_path, name="", tls=False):
    return (f"nbd{'s' if tls else ''}+unix:///"
            + urllib.parse.quote(name, safe="") + "?socket="
            + urllib.parse.quote(socket_path, safe="/"))


def tcp_uri(host, port, name="", tls=False):
    if ":" in host:
        host = f"[{host}]"
    return (f"nbd{'s' if tls else ''}://{host}:{port}/"
            + urllib.parse.quote(name, safe=""))


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
        raise UsageError(nbdkit_failure(proc.stderr.splitlines(),
                                        proc.returncode))
    return wait_pidfile(pidfile, timeout)


def nbdkit_failure(lines, status):
    """nbdkit's last word on why it did not start, as one line."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    if not lines:
        return f"nbdkit failed to start (exit status {status})"
    last = lines[-1]
    for prefix in ("nbdkit: ", "error: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return "nbdkit failed to start: " + last


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


def run_foreground(argv, pidfile, uris, socket_path=None):
    """Run nbdkit as our child; print `uris` once it serves (it writes the
    pidfile after binding); pass SIGTERM/SIGINT on; return its status.
    What nbdkit says before it serves is held back, so a failure to start
    is one line (UsageError); after that its messages pass through.  The
    pidfile and the socket nbdkit leaves behind are removed at the end."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    proc = subprocess.Popen(argv + ["-f"], env=nbdkit_env(),
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    relay = _StderrRelay(proc.stderr)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    try:
        wait_pidfile(pidfile, child=proc)
    except UsageError:
        proc.kill()
        proc.wait()
        relay.join()
        raise UsageError(nbdkit_failure(relay.held, proc.returncode)) \
            from None
    relay.release()
    for uri in uris:
        print(uri, flush=True)
    status = proc.wait()
    relay.join()
    for path in filter(None, (pidfile, socket_path)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return 0 if status in (0, -signal.SIGTERM, -signal.SIGINT) else 1


class _StderrRelay(threading.Thread):
    """Holds a child's stderr lines until release(), then copies them
    (and every later line) to our stderr."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.held = []
        self._released = False
        self._lock = threading.Lock()
        self.start()

    def run(self):
        for line in self.stream:
            with self._lock:
                if self._released:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                else:
                    self.held.append(line)

    def release(self):
        with self._lock:
            sys.stderr.writelines(self.held)
            sys.stderr.flush()
            self._released = True
