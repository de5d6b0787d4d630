"""Named exports: the images one server offers, and how it offers each.

`nbdplug serve` takes exports from `--export NAME=IMAGE[:FMT]` (repeated)
or from a config file, one per instance of hotplug/nbdplug@.service:

    [server]
    listen = 10.0.0.1:10809
    tls-psk = /etc/nbdplug/keys.psk
    allow = 10.0.0.0/24, fd00::/64
    handshake-limit = 10

    [export guest1]
    image = /srv/guest1.qcow2
    format = qcow2
    writable = yes
    limit = 1
    description = guest1 root disk

Inside nbdkit an ExportTable holds one open Disk per export, shared by
every connection to that export, and counts connections for the limit.
The plugin hands it its key=value parameters in order: `export=NAME`
starts an export and the per-export keys after it belong to it (keys
before any `export=` belong to the unnamed export "", as when serving a
single image).
"""

import configparser
import dataclasses
import errno
import os
import re
import threading

from nbdplug.errors import UsageError
from nbdplug.options import parse_bool

# NBD export names are at most 4096 bytes (NBD protocol, "Export name").
MAX_NAME = 4096

SERVER_KEYS = ("listen", "socket", "tls-psk", "tls-certs", "tls-verify-peer",
               "allow", "insecure", "handshake-limit")
EXPORT_KEYS = ("image", "format", "writable", "limit", "description")


@dataclasses.dataclass
class Export:
    name: str
    image: str = None
    format: str = None
    writable: bool = None       # None: the server's default
    limit: int = 0              # concurrent connections; 0: no limit
    description: str = None
    snapshot: str = None        # a qcow2 internal snapshot to serve
    share: bool = False         # read an image others write (-U)


@dataclasses.dataclass
class ServeConfig:
    """What `nbdplug serve` was asked for, from the command line and/or
    a config file (the command line wins where both say something)."""
    exports: list = dataclasses.field(default_factory=list)
    listen: str = None
    socket: str = None
    tls_psk: str = None
    tls_certs: str = None
    tls_verify_peer: bool = False
    allow: list = dataclasses.field(default_factory=list)
    insecure: bool = False
    handshake_limit: int = None     # seconds; None: the plugin's default


class ExportError(UsageError):
    """A client asked for an export it cannot have; `errno` is what
    nbdkit reports (every refusal reaches the client as "unknown
    export", the reason goes to the server's log)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.errno = code


def parse_count(key, value, unit="connections"):
    """A limit: a number of `unit`, 0 for none."""
    if not value.strip().isdigit():
        raise UsageError(f"{key}={value}: expected a number of {unit} "
                         "(0 for no limit)")
    return int(value)


def check_name(name):
    if len(name.encode()) > MAX_NAME or \
            any(c < " " or c == "\x7f" for c in name):
        raise UsageError(f"export name {name!r}: control characters or "
                         f"longer than {MAX_NAME} bytes")
    return name


def parse_export(text, formats, default_format=None):
    """`NAME=IMAGE[:FMT]` → Export; FMT only when it names a format, so
    image paths may hold colons."""
    name, sep, image = text.partition("=")
    if not sep or not name or not image:
        raise UsageError(f"--export {text!r}: expected NAME=IMAGE[:FMT]")
    fmt = default_format
    head, colon, tail = image.rpartition(":")
    if colon and tail in formats:
        image, fmt = head, tail
    return Export(check_name(name), image, fmt)


def load(path, formats):
    """Read a config file (see the module docstring) → ServeConfig."""
    parser = configparser.ConfigParser(interpolation=None,
                                       default_section="\0none")
    try:
        with open(path) as f:
            parser.read_file(f)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file") from None
    except configparser.Error as e:
        reason = re.sub(r"^While reading from .*?\[line\s+(\d+)\]: ",
                        r"line \1: ", str(e).splitlines()[0])
        raise UsageError(f"{path}: {reason}") from None
    base = os.path.dirname(os.path.abspath(path))
    cfg = ServeConfig()
    for section in parser.sections():
        items = dict(parser.items(section))
        where = f"{path}: [{section}]"
        if section == "server":
            _server_section(cfg, items, where, base)
            continue
        kind, _, name = section.partition(" ")
        if kind != "export" or not name.strip():
            raise UsageError(f"{where}: expected [server] or [export NAME]")
        name = check_name(name.strip())
        if any(e.name == name for e in cfg.exports):
            raise UsageError(f"{where}: export {name!r} given twice")
        cfg.exports.append(_export_section(name, items, where, base,
                                           formats))
    return cfg


def _unknown(items, known, where):
    for key in items:
        if key not in known:
            raise UsageError(f"{where}: unknown key {key!r} (known: "
                             + ", ".join(known) + ")")


def _server_section(cfg, items, where, base):
    _unknown(items, SERVER_KEYS, where)
    cfg.listen = items.get("listen")
    # Paths are taken relative to the config file's directory.
    for key in ("socket", "tls-psk", "tls-certs"):
        if key in items:
            setattr(cfg, key.replace("-", "_"),
                    os.path.join(base, items[key]))
    for key in ("tls-verify-peer", "insecure"):
        if key in items:
            setattr(cfg, key.replace("-", "_"),
                    parse_bool(f"{where} {key}", items[key]))
    if "allow" in items:
        cfg.allow = [a.strip() for a in items["allow"].split(",")
                     if a.strip()]
    if "handshake-limit" in items:
        cfg.handshake_limit = parse_count(f"{where} handshake-limit",
                                          items["handshake-limit"], "seconds")


def _export_section(name, items, where, base, formats):
    _unknown(items, EXPORT_KEYS, where)
    if not items.get("image"):
        raise UsageError(f"{where}: image = PATH is required")
    export = Export(name, os.path.join(base, items["image"]))
    if "format" in items:
        if items["format"] not in formats:
            raise UsageError(f"{where}: unknown format {items['format']!r} "
                             "(known: " + ", ".join(sorted(formats)) + ")")
        export.format = items["format"]
    if "writable" in items:
        export.writable = parse_bool(f"{where} writable", items["writable"])
    if "limit" in items:
        export.limit = parse_count(f"{where} limit", items["limit"])
    export.description = items.get("description") or None
    return export


class ExportTable:
    """The exports of one nbdkit process: configured key by key, opened
    once, then shared by every connection."""

    # Plugin keys that belong to the current export, and how to read them.
    KEYS = {
        "file": ("image", str),
        "format": ("format", str),
        "readonly": ("writable", lambda k, v: not parse_bool(k, v)),
        "limit": ("limit", parse_count),
        "description": ("description", str),
        "snapshot": ("snapshot", str),
        "force-share": ("share", parse_bool),
    }

    def __init__(self):
        self.exports = {}           # name -> Export, in configured order
        self._current = None
        self._disks = {}            # name -> Disk
        self._names = {}            # id(Disk) -> name
        self._users = {}            # name -> connections open now
        self._lock = threading.Lock()

    # --- configuration (nbdkit's config phase) -------------------------

    def configure(self, key, value):
        """One plugin parameter; False if the key is not an export's."""
        if key == "export":
            name = check_name(value)
            if name in self.exports:
                raise UsageError(f"export {name!r} given twice")
            self._current = self.exports[name] = Export(name)
            return True
        if key not in self.KEYS:
            return False
        if self._current is None:
            self._current = self.exports[""] = Export("")
        field, parse = self.KEYS[key]
        setattr(self._current, field,
                value if parse is str else parse(key, value))
        return True

    def check(self):
        if not self.exports:
            raise UsageError("file=IMAGE (or export=NAME file=IMAGE) is "
                             "required")
        for export in self.exports.values():
            if export.image is None:
                raise UsageError(f"export {export.name!r}: file=IMAGE is "
                                 "required")

    # --- lifetime -------------------------------------------------------

    def open_all(self, opener):
        """Open every export's Disk with `opener(export)`; all or none."""
        try:
            for name, export in self.exports.items():
                disk = opener(export)
                self._disks[name] = disk
                self._names[id(disk)] = name
                self._users[name] = 0
        except BaseException:
            self.close_all()
            raise

    def close_all(self):
        """Flush every writable Disk and close it (also after errors)."""
        first = None
        for disk in self._disks.values():
            try:
                if not disk.readonly:
                    disk.flush()
            except Exception as e:
                first = first or e
            finally:
                disk.close()
        self._disks.clear()
        self._names.clear()
        if first is not None:
            raise first

    # --- connections ----------------------------------------------------

    def default_name(self):
        """What the empty export name means: the export named "" if any,
        else the only export; with several, nothing."""
        if "" in self.exports or len(self.exports) != 1:
            return ""
        return next(iter(self.exports))

    def opened(self, name=""):
        """The Disk open for export `name` (after open_all)."""
        return self._disks[name]

    def connect(self, name):
        """The Disk for a new connection to export `name`."""
        disk = self._disks.get(name)
        if disk is None:
            known = ", ".join(repr(n) for n in self.exports)
            raise ExportError(f"no export named {name!r} (exports: {known})",
                              errno.ENOENT)
        limit = self.exports[name].limit
        with self._lock:
            if limit and self._users[name] >= limit:
                raise ExportError(f"export {name!r} already has its limit "
                                  f"of {limit} connections", errno.EBUSY)
            self._users[name] += 1
        return disk

    def disconnect(self, disk):
        with self._lock:
            name = self._names.get(id(disk))
            if name is not None:
                self._users[name] -= 1

    def listing(self):
        """(name, description) for NBD_OPT_LIST."""
        return [(e.name, e.description or "") for e in self.exports.values()]

    def description(self, disk):
        return self.exports[self._names[id(disk)]].description or ""
