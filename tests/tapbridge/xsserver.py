"""A small xenstore server for tests, speaking the real wire protocol of
Xen's xs_wire.h over a Unix socket (the one libxenstore and pyxs find
through XENSTORED_PATH), since no xenstored runs without a hypervisor.

What it keeps of xenstored's behaviour, because backends depend on it:

- string values only; writing a node creates its parents (empty);
  relative paths resolve against /local/domain/0 (every client is dom0);
- a watch fires once when registered, then for every change at or below
  its path, and when an ancestor is removed (with the watch's own path);
- transactions work on a snapshot and fail to commit with EAGAIN when
  the store changed meanwhile (or when a test asks: `fail_commits`);
- errors are answered as XS_ERROR with the errno name.

The message type numbers are asserted against the header by the tests.
"""

import errno
import os
import selectors
import socket
import struct
import threading

# enum xsd_sockmsg_type
XS_CONTROL, XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH = \
    range(6)
XS_TRANSACTION_START, XS_TRANSACTION_END, XS_INTRODUCE, XS_RELEASE = \
    range(6, 10)
XS_GET_DOMAIN_PATH, XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS = range(10, 15)
XS_WATCH_EVENT, XS_ERROR, XS_IS_DOMAIN_INTRODUCED = range(15, 18)
XS_RESUME, XS_SET_TARGET = 18, 19
XS_RESET_WATCHES, XS_DIRECTORY_PART = 21, 22

XSD_SOCKMSG = struct.Struct("<IIII")        # type, req_id, tx_id, len
XENSTORE_PAYLOAD_MAX = 4096
HOME = "/local/domain/0"


class XsError(Exception):
    def __init__(self, code):
        super().__init__(errno.errorcode[code])
        self.code = code


def _parent(path):
    return path.rsplit("/", 1)[0] or "/"


def _is_child(child, parent):
    """`child` is `parent` or below it."""
    return child == parent or parent == "/" or \
        child.startswith(parent + "/")


class Store:
    """The tree as {absolute path: value}; "/" always exists."""

    def __init__(self, nodes=None):
        self.nodes = dict(nodes or {"/": b""})
        self.perms = {}

    def copy(self):
        s = Store(self.nodes)
        s.perms = dict(self.perms)
        return s

    def read(self, path):
        if path not in self.nodes:
            raise XsError(errno.ENOENT)
        return self.nodes[path]

    def children(self, path):
        if path not in self.nodes:
            raise XsError(errno.ENOENT)
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.nodes
                       if p.startswith(prefix) and p != prefix})

    def write(self, path, value):
        """Set a value, creating missing parents; as xenstored, only the
        node itself counts as changed for watches."""
        p = _parent(path)
        while p not in self.nodes:
            self.nodes[p] = b""
            p = _parent(p)
        self.nodes[path] = value
        return [path]

    def mkdir(self, path):
        return [] if path in self.nodes else self.write(path, b"")

    def rm(self, path):
        if path not in self.nodes:
            if _parent(path) not in self.nodes:
                raise XsError(errno.ENOENT)
            return []
        if path == "/":
            raise XsError(errno.EINVAL)
        for p in [p for p in self.nodes if _is_child(p, path)]:
            del self.nodes[p]
            self.perms.pop(p, None)
        return [path]


class Connection:
    def __init__(self, sock):
        self.sock = sock
        self.inbuf = b""
        self.watches = []           # (path as given, absolute, token)
        self.transactions = {}      # id -> (Store copy, generation, changed)


class XenstoreServer:
    """Serve a Store on a Unix socket from a thread.

        with XenstoreServer(path) as xs:   # xs.store, xs.fail_commits
            ...
    """

    def __init__(self, path):
        self.path = path
        self.store = Store()
        self.generation = 0
        self.fail_commits = 0       # fail this many commits with EAGAIN
        self.log = []               # (type, payload) of every request
        self._lock = threading.RLock()
        self._next_tx = 1
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._stop_r, self._stop_w = os.pipe()
        self._sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        self._conns = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        for c in self._conns:
            c.sock.close()
        self._listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        os.unlink(self.path)

    # --- for tests: change the store as another domain would -----------

    def read(self, path):
        with self._lock:
            return self.store.nodes.get(path, b"").decode() \
                if path in self.store.nodes else None

    def write(self, path, value):
        self.write_all({path: value})

    def write_all(self, values):
        """Write {path: value} at once, as one transaction would."""
        with self._lock:
            changed = []
            for path, value in values.items():
                changed += self.store.write(path, str(value).encode())
            self._commit_changes(changed)

    def watched(self):
        """Every (path, token) some client watches."""
        with self._lock:
            return [(w[1], w[2].decode()) for c in self._conns
                    for w in c.watches]

    def rm(self, path):
        with self._lock:
            self._commit_changes(self.store.rm(path), removal=True)

    def tree(self, top):
        with self._lock:
            return {p[len(top) + 1:]: v.decode()
                    for p, v in self.store.nodes.items()
                    if p.startswith(top + "/")}

    # --- the event loop --------------------------------------------------

    def _loop(self):
        while True:
            for key, _ in self._sel.select():
                if key.data == "stop":
                    return
                if key.data is None:
                    sock, _ = self._listener.accept()
                    conn = Connection(sock)
                    self._conns.append(conn)
                    self._sel.register(sock, selectors.EVENT_READ, conn)
                else:
                    self._receive(key.data)

    def _receive(self, conn):
        try:
            data = conn.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(conn.sock)
            conn.sock.close()
            self._conns.remove(conn)
            return
        conn.inbuf += data
        while len(conn.inbuf) >= XSD_SOCKMSG.size:
            kind, req_id, tx_id, length = XSD_SOCKMSG.unpack_from(conn.inbuf)
            if len(conn.inbuf) < XSD_SOCKMSG.size + length:
                break
            payload = conn.inbuf[XSD_SOCKMSG.size:XSD_SOCKMSG.size + length]
            conn.inbuf = conn.inbuf[XSD_SOCKMSG.size + length:]
            with self._lock:
                self.log.append((kind, payload))
                events = []
                try:
                    if length > XENSTORE_PAYLOAD_MAX:
                        raise XsError(errno.E2BIG)
                    reply = self._handle(conn, kind, tx_id, payload, events)
                    self._send(conn, kind, req_id, tx_id, reply)
                except XsError as e:
                    self._send(conn, XS_ERROR, req_id, tx_id,
                               errno.errorcode[e.code].encode() + b"\0")
                for target, path, token in events:
                    self._send(target, XS_WATCH_EVENT, 0, 0,
                               path.encode() + b"\0" + token + b"\0")

    def _send(self, conn, kind, req_id, tx_id, payload):
        try:
            conn.sock.sendall(XSD_SOCKMSG.pack(kind, req_id, tx_id,
                                               len(payload)) + payload)
        except OSError:
            pass

    # --- requests ----------------------------------------------------------

    @staticmethod
    def _path(raw):
        path = raw.decode()
        if not path:
            raise XsError(errno.EINVAL)
        if not path.startswith("/"):
            path = HOME + "/" + path
        if path != "/" and (path.endswith("/") or "//" in path):
            raise XsError(errno.EINVAL)
        return path

    def _store(self, conn, tx_id):
        if tx_id == 0:
            return self.store
        if tx_id not in conn.transactions:
            raise XsError(errno.ENOENT)
        return conn.transactions[tx_id][0]

    def _handle(self, conn, kind, tx_id, payload, events):
        args = payload.split(b"\0")
        if kind == XS_READ:
            return self._store(conn, tx_id).read(self._path(args[0]))
        if kind == XS_DIRECTORY:
            names = self._store(conn, tx_id).children(self._path(args[0]))
            return b"".join(n.encode() + b"\0" for n in names)
        if kind in (XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS):
            store = self._store(conn, tx_id)
            path = self._path(args[0])
            if kind == XS_WRITE:
                changed = store.write(path, payload.split(b"\0", 1)[1])
            elif kind == XS_MKDIR:
                changed = store.mkdir(path)
            elif kind == XS_RM:
                changed = store.rm(path)
            else:
                store.read(path)
                store.perms[path] = [a for a in args[1:] if a]
                changed = [path]
            if tx_id:
                conn.transactions[tx_id][2].extend(
                    (c, kind == XS_RM) for c in changed)
            else:
                events += self._commit_changes(changed, kind == XS_RM,
                                               deliver=False)
            return b"OK\0"
        if kind == XS_GET_PERMS:
            store = self._store(conn, tx_id)
            path = self._path(args[0])
            store.read(path)
            return b"".join(p + b"\0"
                            for p in store.perms.get(path, [b"n0"]))
        if kind == XS_WATCH:
            given, token = args[0].decode(), args[1]
            conn.watches.append((given, self._path(args[0]), token))
            # xenstored fires every new watch once, at once.
            events.append((conn, given, token))
            return b"OK\0"
        if kind == XS_UNWATCH:
            given, token = args[0].decode(), args[1]
            for w in conn.watches:
                if w[0] == given and w[2] == token:
                    conn.watches.remove(w)
                    return b"OK\0"
            raise XsError(errno.ENOENT)
        if kind == XS_RESET_WATCHES:
            conn.watches.clear()
            return b"OK\0"
        if kind == XS_TRANSACTION_START:
            tx = self._next_tx
            self._next_tx += 1
            conn.transactions[tx] = (self.store.copy(), self.generation, [])
            return str(tx).encode() + b"\0"
        if kind == XS_TRANSACTION_END:
            if tx_id not in conn.transactions:
                raise XsError(errno.ENOENT)
            copy, generation, changed = conn.transactions.pop(tx_id)
            if args[0] == b"T":
                if self.fail_commits or generation != self.generation:
                    self.fail_commits = max(0, self.fail_commits - 1)
                    raise XsError(errno.EAGAIN)
                self.store = copy
                for path, removal in changed:
                    events += self._commit_changes([path], removal,
                                                   deliver=False)
            return b"OK\0"
        if kind == XS_GET_DOMAIN_PATH:
            return f"/local/domain/{int(args[0])}".encode() + b"\0"
        if kind == XS_IS_DOMAIN_INTRODUCED:
            return b"T\0"
        raise XsError(errno.ENOSYS if kind < XS_DIRECTORY_PART + 1
                      else errno.EINVAL)

    def _commit_changes(self, changed, removal=False, deliver=True):
        """Bump the generation; the watch events the changes fire."""
        if not changed:
            return []
        self.generation += 1
        events = []
        for conn in self._conns:
            for given, path, token in conn.watches:
                for c in changed:
                    if _is_child(c, path):
                        events.append((conn, self._shown(given, c), token))
                    elif removal and _is_child(path, c):
                        events.append((conn, given, token))
        if deliver:
            for target, path, token in events:
                self._send(target, XS_WATCH_EVENT, 0, 0,
                           path.encode() + b"\0" + token + b"\0")
        return events

    @staticmethod
    def _shown(given, path):
        """An event path as the watcher named it (relative or not)."""
        if given.startswith("/"):
            return path
        return path[len(HOME) + 1:] if path.startswith(HOME + "/") \
            else path
