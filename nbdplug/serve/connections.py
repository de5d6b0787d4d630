"""The client connections of the nbdkit process the plugin runs in.

nbdkit 1.32's Python module tells a plugin neither its client's address
nor how to drop a client, and nbdkit's own mechanisms fall short here:
the ip filter as Debian builds it parses no address at all (only
keywords such as "all"), SIGTERM waits for every client to hang up (so a
server with an idle client never stops), and nothing limits how long a
client may take over its handshake.  What we use instead:

- nbdkit's C API, which the nbdkit executable exports to its plugins,
  through ctypes: nbdkit_peer_name (on a connection's thread, its
  client's address) and nbdkit_error;
- the sockets nbdkit accepted, found through /proc/self/fd, which we may
  shut down (the connection's thread then sees end of file and ends it
  cleanly).
"""

import contextlib
import ctypes
import dataclasses
import functools
import heapq
import ipaddress
import itertools
import os
import signal
import socket
import sys
import threading
import time

# Seconds a TCP client may take from connecting to having an export open
# (qemu-nbd's --handshake-limit has the same default).
HANDSHAKE_LIMIT = 10


@functools.cache
def _nbdkit():
    """The nbdkit executable's exported functions."""
    return ctypes.CDLL(None)


def log(message):
    """One line in nbdkit's log (stderr, or syslog once it forked)."""
    _nbdkit().nbdkit_error(b"%s", message.encode(errors="replace"))


@contextlib.contextmanager
def _sockets():
    """Duplicates of this process's stream sockets, closed on leaving."""
    socks = []
    try:
        for name in os.listdir("/proc/self/fd"):
            try:
                if not os.readlink(f"/proc/self/fd/{name}").startswith(
                        "socket:"):
                    continue
                sock = socket.socket(fileno=os.dup(int(name)))
            except OSError:
                continue                # closed meanwhile, or not a socket
            if sock.type == socket.SOCK_STREAM:
                socks.append(sock)
            else:
                sock.close()
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _accepted(socks):
    """Our clients' sockets among `socks`: not listening, and with a local
    address we listen on (so not, say, the libnbd connection behind a
    remote export)."""
    listening = {_local_address(s) for s in socks if _listens(s)}
    return [s for s in socks
            if not _listens(s) and _local_address(s) in listening]


def _listens(sock):
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


def _local_address(sock):
    name = sock.getsockname()
    return sock.family, name if sock.family == socket.AF_UNIX else name[1]


def _inet(name):
    """(ip_address, port) from a socket address as Python gives it."""
    return ipaddress.ip_address(name[0].partition("%")[0]), name[1]


def _hang_up(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass                            # already gone


def _peer_name():
    """nbdkit_peer_name on this connection's thread → (ip_address, port);
    None when the client is not on TCP."""
    buf = ctypes.create_string_buffer(128)      # sockaddr_storage
    size = ctypes.c_uint32(len(buf))            # socklen_t
    if _nbdkit().nbdkit_peer_name(buf, ctypes.byref(size)) == -1:
        return None
    raw = buf.raw[:size.value]
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:                # sockaddr_in
        return ipaddress.ip_address(raw[4:8]), port
    if family == socket.AF_INET6:               # sockaddr_in6
        return ipaddress.ip_address(raw[8:24]), port
    return None


@dataclasses.dataclass(frozen=True)
class Client:
    """A TCP client of this nbdkit: its address and the inode of the
    socket nbdkit accepted for it (which names that one connection for
    as long as it lasts, whatever file descriptor numbers are reused;
    None when the socket was not found: the client left already)."""
    address: object                 # ipaddress.IPv4Address or IPv6Address
    port: int
    inode: int = None

    def __str__(self):
        host = (f"[{self.address}]" if self.address.version == 6
                else str(self.address))
        return f"{host}:{self.port}"

    def allowed(self, networks):
        addr = getattr(self.address, "ipv4_mapped", None) or self.address
        return any(addr in net for net in networks)

    def hang_up(self):
        """Shut the client's socket down; False if it is gone already."""
        if self.inode is None:
            return False
        with _sockets() as socks:
            for sock in socks:
                if os.fstat(sock.fileno()).st_ino == self.inode:
                    _hang_up(sock)
                    return True
        return False


def this_client():
    """The TCP client of the connection whose thread calls this (from
    preconnect on), or None when it came through a Unix socket.  nbdkit
    names a Unix client by no more than its process, which may hold
    several connections; a TCP client's address and port name one."""
    peer = _peer_name()
    if peer is None:
        return None
    with _sockets() as socks:
        for sock in _accepted(socks):
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                if _inet(sock.getpeername()) == peer:
                    return Client(*peer, os.fstat(sock.fileno()).st_ino)
            except OSError:
                continue                # hung up already
    return Client(*peer)


@dataclasses.dataclass(eq=False)
class _Handshake:
    client: Client
    thread: int                     # the connection's thread (native id)
    open: bool = False              # an export is open for the client
    expired: bool = False           # open when its deadline passed


class HandshakeLimit:
    """Hang up on a TCP client that has no export open `seconds` after
    connecting, whatever it does meanwhile (nothing, one byte a second,
    a TLS handshake it never finishes).

    Open means nbdkit called the plugin's open for the client, which it
    does once the client asks for an export (NBD_OPT_GO).  NBD_OPT_INFO
    opens and closes again, so a close puts the connection back under
    watch: looked at again a moment later, it is over (its thread has
    ended) or negotiating past its limit.  One thread waits for the next
    deadline."""

    AFTER_CLOSE = 1.0               # seconds

    def __init__(self):
        self.seconds = 0
        self._by_thread = {}            # connection thread -> _Handshake
        self._due = []                  # heap of (time, sequence, entry)
        self._sequence = itertools.count()
        self._cond = threading.Condition()
        self._thread = None
        self._stopping = False

    def start(self, seconds):
        """Begin watching (nbdkit's after_fork); 0 seconds: no limit."""
        self.seconds = seconds
        if seconds:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def begin(self, client):
        """`client` connected (preconnect, on its connection's thread)."""
        if self._thread is None or client.inode is None:
            return
        entry = _Handshake(client, threading.get_native_id())
        with self._cond:
            self._by_thread[entry.thread] = entry
            self._watch(entry, self.seconds)

    def opened(self):
        """This connection's client has an export open (open)."""
        with self._cond:
            entry = self._by_thread.get(threading.get_native_id())
            if entry is not None:
                entry.open = True

    def closed(self):
        """This connection's export was closed (close)."""
        with self._cond:
            entry = self._by_thread.get(threading.get_native_id())
            if entry is not None:
                entry.open = False
                if entry.expired:
                    entry.expired = False
                    self._watch(entry, self.AFTER_CLOSE)

    def _watch(self, entry, seconds):
        heapq.heappush(self._due, (time.monotonic() + seconds,
                                   next(self._sequence), entry))
        self._cond.notify()

    def _run(self):
        while True:
            with self._cond:
                while not self._stopping and not (
                        self._due and self._due[0][0] <= time.monotonic()):
                    self._cond.wait(self._due[0][0] - time.monotonic()
                                    if self._due else None)
                if self._stopping:
                    return
                entry = heapq.heappop(self._due)[2]
                if entry.open:
                    entry.expired = True        # watched again on close
                    continue
                if self._by_thread.get(entry.thread) is entry:
                    del self._by_thread[entry.thread]
                if not os.path.exists(f"/proc/self/task/{entry.thread}"):
                    continue                    # the connection is over
            if entry.client.hang_up():
                log(f"client {entry.client} had no export open after "
                    f"{self.seconds:g} s: hung up")

    def end(self):
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._thread.join()


class StopOnSignal:
    """Stop serving on SIGTERM or SIGINT even with clients connected.

    Python's C-level handler writes the signal number to a pipe (its
    wakeup fd); a thread waiting on the pipe asks nbdkit to shut down
    (`shutdown`, nbdkit.shutdown) and hangs up on every client, so each
    connection ends and nbdkit goes on to the plugin's cleanup.  Start it
    from nbdkit's main thread (Python installs handlers only there)."""

    def __init__(self, shutdown):
        self.shutdown = shutdown
        self.pipe = self.thread = None

    def start(self):
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            signal.set_wakeup_fd(w)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: None)
        except ValueError:              # not the main thread: keep nbdkit's
            os.close(r)
            os.close(w)
            return
        self.pipe = (r, w)
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self):
        if os.read(self.pipe[0], 1) == b"\0":      # end(): exiting anyway
            return
        self.shutdown()
        with _sockets() as socks:
            for sock in _accepted(socks):
                _hang_up(sock)

    def end(self):
        if self.thread is not None:
            os.write(self.pipe[1], b"\0")
            self.thread.join()
