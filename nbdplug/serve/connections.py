"""The client connections of the nbdkit process the plugin runs in.

nbdkit 1.32 gives a Python plugin neither its client's address nor a way
to drop a client, and two of its own mechanisms fall short here: the ip
filter as Debian builds it parses no address at all (only keywords such
as "all"), and SIGTERM waits for every client to hang up, so a server
with an idle client never stops.  Both need the same thing: the sockets
nbdkit accepted, found through /proc/self/fd, which we may shut down
(the connection's thread then sees end of file and ends it cleanly).
"""

import ipaddress
import os
import signal
import socket
import threading


def accepted_sockets():
    """Duplicates of our clients' sockets: stream sockets, not listening,
    whose local address is one we listen on (so not, say, the libnbd
    connection behind a remote export).  The caller closes them."""
    listening, others = set(), []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue                    # closed meanwhile, or not a socket
        if sock.type != socket.SOCK_STREAM:
            sock.close()
        elif sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listening.add(_local_address(sock))
            sock.close()
        else:
            others.append(sock)
    accepted = []
    for sock in others:
        if _local_address(sock) in listening:
            accepted.append(sock)
        else:
            sock.close()
    return accepted


def _local_address(sock):
    name = sock.getsockname()
    return sock.family, name if sock.family == socket.AF_UNIX else name[1]


def _hang_up(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass                            # already gone


def refuse_others(networks):
    """Shut down every TCP client whose address is in none of `networks`
    (ipaddress networks).  Run from preconnect: each connection calls it
    after its own accept and before its handshake, so every client is
    checked before it can send or receive a byte of NBD."""
    for sock in accepted_sockets():
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                addr = ipaddress.ip_address(sock.getpeername()[0])
            except OSError:
                continue                # hung up already
            addr = getattr(addr, "ipv4_mapped", None) or addr
            if not any(addr in net for net in networks):
                _hang_up(sock)


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
        for sock in accepted_sockets():
            with sock:
                _hang_up(sock)

    def end(self):
        if self.thread is not None:
            os.write(self.pipe[1], b"\0")
            self.thread.join()
