"""The xenstore side of a vbd backend: blkback's state machine for the
devices xl gives to the block-tapbridge hotplug script.

    /local/domain/<us>/backend/vbd/<frontend domid>/<devid>/  (ours)
    <frontend>/ (its "frontend" key)                          (the guest's)

- A new device is probed at once: the features known before opening the
  image are written and the state goes to InitWait, which libxl waits for
  before it runs the hotplug script.
- The hotplug script resolves xl's target into physical-device-path and
  tapbridge-format; we open the image then (as blkback opens its block
  device when physical-device appears) and answer in tapbridge-status,
  "opened" or "error" with tapbridge-error, which the script waits for:
  so a bad image fails `xl create` with its reason, and no Python starts
  per disk.  The image stays open until the device goes.
- When the hotplug script said hotplug-status=connected and the frontend
  is Initialised (or already Connected), we read its ring-ref(s),
  event-channel and protocol, map the ring, write sectors, info and the
  features in one transaction with state Connected, and serve the ring
  on a Dispatcher thread.  A frontend that took up multi-queue has a
  ring and an event channel per queue (queue-N/), each served by its own
  Dispatcher on the one image.
- Frontend Closing -> Closing; frontend Closed -> disconnect, Closed,
  and forget the device if online is 0 (the toolstack is removing it);
  a frontend that returns to Initialising after Closed (a guest reboot)
  gets InitWait again and reconnects with its new ring.

Every watch event re-evaluates the device from what xenstore says now,
because events coalesce and arrive in any order.  The xenstore client is
pyxs over the xenstored socket; nothing here knows which server answers.
"""

import errno
import logging
import os
import queue
import threading

import pyxs

from nbdplug.errors import ImageError, UsageError
from nbdplug.opener import open_image

from . import abi
from .abi import (MAX_RING_PAGE_ORDER, PROTOCOL_DEFAULT, PROTOCOLS,
                  VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE,
                  XenbusStateClosed, XenbusStateClosing,
                  XenbusStateConnected, XenbusStateInitialised,
                  XenbusStateInitialising, XenbusStateInitWait,
                  XenbusStateUnknown)
from .dispatch import DEFAULT_WORKERS, MAX_INDIRECT_SEGMENTS, Dispatcher
from .ring import RingOverrun

log = logging.getLogger("tapbridge")

SCRIPT = "block-tapbridge"      # the devices we serve name this script
# Rings a frontend may use per device (multi-queue-max-queues), as blkback
# one per CPU of ours, and no more than this.
MAX_QUEUES = 4
COMMIT_ATTEMPTS = 20
_REQUIRED = object()


class XenstoreError(Exception):
    pass


class Xenstore:
    """pyxs with str paths and values: None for a missing node."""

    def __init__(self, socket_path=None):
        self.client = pyxs.Client(unix_socket_path=socket_path)
        self.client.connect()
        self.monitor = self.client.monitor()

    def read(self, path):
        try:
            return self.client.read(path.encode()).decode()
        except pyxs.PyXSError as e:
            if e.args[0] == errno.ENOENT:
                return None
            raise

    def list(self, path):
        try:
            return [n.decode() for n in self.client.list(path.encode())]
        except pyxs.PyXSError as e:
            if e.args[0] == errno.ENOENT:
                return []
            raise

    def write(self, path, value):
        self.client.write(path.encode(), str(value).encode())

    def write_all(self, values):
        """Write {path: value} in one transaction, retried on EAGAIN."""
        for _ in range(COMMIT_ATTEMPTS):
            self.client.transaction()
            try:
                for path, value in values.items():
                    self.write(path, value)
            except BaseException:
                self.client.rollback()
                raise
            if self.client.commit():
                return
        raise XenstoreError("transaction failed with EAGAIN "
                            f"{COMMIT_ATTEMPTS} times")

    def watch(self, path, token):
        self.monitor.watch(path.encode(), token.encode())

    def unwatch(self, path, token):
        self.monitor.unwatch(path.encode(), token.encode())

    def next_event(self, timeout):
        """(path, token) of the next watch event, or None after timeout."""
        try:
            event = self.monitor.events.get(timeout=timeout)
        except queue.Empty:
            return None
        return event.path.decode(), event.token.decode()

    def close(self):
        self.client.close()


class DeviceError(Exception):
    """The frontend asked for something we cannot serve."""


class Device:
    """One vbd: the backend directory `path`, re-evaluated on each event."""

    def __init__(self, backend, path):
        self.backend = backend
        self.xs = backend.xs
        self.path = path
        self.state = None           # what we last wrote to state
        self.frontend = None        # the frontend directory we watch
        self.retired = False        # closed for good; wait for rm
        self.disk = None            # the image, once the script named it
        self.readonly = True
        self.open_error = None      # why it would not open
        self.serving = []           # (dispatcher, thread, transport)s

    def key(self, name):
        return self.xs.read(f"{self.path}/{name}")

    def guest_int(self, path, default=_REQUIRED):
        """A number the guest wrote (so anything at all): an unsigned
        32-bit integer, `default` when absent, else DeviceError."""
        text = self.xs.read(path)
        if text is None:
            if default is _REQUIRED:
                raise DeviceError(f"{path} is missing")
            return default
        if not text.isdigit() or int(text) > 0xFFFFFFFF:
            raise DeviceError(f"{path}: {text[:64]!r} is not a number")
        return int(text)

    def switch(self, state):
        self.xs.write(f"{self.path}/state", state)
        self.state = state

    def update(self):
        if self.retired:
            return
        if os.path.basename(self.key("script") or "") != SCRIPT:
            self.retired = True     # another backend's device
            return
        if self.frontend is None:
            self.frontend = self.key("frontend")
            if self.frontend:
                self.xs.watch(f"{self.frontend}/state", self.path)
        if self.state is None:
            self.probe()
        self.open_if_named()
        fe_state = XenbusStateUnknown
        if self.frontend:
            try:    # as xenbus_read_driver_state: garbage is Unknown
                fe_state = self.guest_int(f"{self.frontend}/state",
                                          XenbusStateUnknown)
            except DeviceError:
                pass
        if fe_state in (XenbusStateInitialised, XenbusStateConnected):
            if self.state == XenbusStateInitWait and \
                    self.key("hotplug-status") == "connected":
                # The script may have named the image since we looked
                # above: its path is written before hotplug-status.
                self.open_if_named()
                self.connect()
        elif fe_state == XenbusStateClosing:
            if self.state not in (XenbusStateClosing, XenbusStateClosed):
                self.switch(XenbusStateClosing)
        elif fe_state in (XenbusStateClosed, XenbusStateUnknown):
            self.disconnect()
            if self.state != XenbusStateClosed:
                self.switch(XenbusStateClosed)
            if self.key("online") != "1" or fe_state == XenbusStateUnknown:
                self.retire()
        elif fe_state == XenbusStateInitialising and \
                self.state == XenbusStateClosed:
            log.info("%s: frontend reinitialising, ready to reconnect",
                     self.path)
            self.switch(XenbusStateInitWait)

    def probe(self):
        """Say what we can do before the image is open, then InitWait:
        libxl waits for that state before running the hotplug script."""
        self.xs.write_all({
            f"{self.path}/feature-max-indirect-segments":
                MAX_INDIRECT_SEGMENTS,
            f"{self.path}/max-ring-page-order": MAX_RING_PAGE_ORDER,
            f"{self.path}/multi-queue-max-queues": self.backend.max_queues,
            f"{self.path}/state": XenbusStateInitWait})
        self.state = XenbusStateInitWait

    def open_if_named(self):
        if self.disk is None and self.open_error is None and \
                self.key("physical-device-path") is not None:
            self.open()

    def open(self):
        """Open the image the hotplug script named; tell it how that went."""
        path = self.key("physical-device-path")
        fmt = self.key("tapbridge-format") or None
        self.readonly = self.key("mode") != "w"
        try:
            self.disk = open_image(path, fmt, readonly=self.readonly)
        except (ImageError, UsageError, OSError) as e:
            self.open_error = str(e)
            log.error("%s: %s", self.path, e)
            self.xs.write_all({f"{self.path}/tapbridge-error": e,
                               f"{self.path}/tapbridge-status": "error"})
            return
        self.xs.write(f"{self.path}/tapbridge-status", "opened")

    def connect(self):
        try:
            self._connect()
        except (DeviceError, ImageError, OSError) as e:
            self.fatal(str(e))

    def _connect(self):
        fe = self.frontend
        domid = self.guest_int(f"{self.path}/frontend-id")
        order = self.guest_int(f"{fe}/ring-page-order", None)
        if order is None:
            order, names = 0, ["ring-ref"]
        elif order > MAX_RING_PAGE_ORDER:
            raise DeviceError(f"ring-page-order {order} is above "
                              f"{MAX_RING_PAGE_ORDER}")
        else:
            names = [f"ring-ref{i}" for i in range(1 << order)]
        nqueues = self.guest_int(f"{fe}/multi-queue-num-queues", 1)
        if not 1 <= nqueues <= self.backend.max_queues:
            raise DeviceError(f"multi-queue-num-queues {nqueues}: "
                              f"{self.backend.max_queues} were offered")
        queues = [fe] if nqueues == 1 else \
            [f"{fe}/queue-{i}" for i in range(nqueues)]
        # Every ring's keys first: nothing is mapped for a bad frontend.
        rings = [([self.guest_int(f"{q}/{name}") for name in names],
                  self.guest_int(f"{q}/event-channel")) for q in queues]
        # Both ends must offer persistent grants for them to be used.
        persistent = self.backend.persistent and \
            self.guest_int(f"{fe}/feature-persistent", 0) == 1
        proto = self.xs.read(f"{fe}/protocol")
        if proto is None:
            log.warning("%s: no protocol key, assuming %s", self.path,
                        PROTOCOL_DEFAULT)
            proto = PROTOCOL_DEFAULT
        if proto not in PROTOCOLS:
            raise DeviceError(f"unknown protocol {proto!r}")
        disk, readonly = self.disk, self.readonly
        if disk is None:
            raise DeviceError(self.open_error or "no image: the hotplug "
                              "script named none")
        try:
            for refs, port in rings:
                self._serve_ring(domid, refs, order, port, persistent,
                                 PROTOCOLS[proto])
        except BaseException:
            self.disconnect()
            raise
        dispatcher = self.serving[0][0]
        info = (VDISK_READONLY if readonly else 0) | \
            (VDISK_CDROM if self.key("device-type") == "cdrom" else 0) | \
            (VDISK_REMOVABLE if self.key("removable") == "1" else 0)
        p = self.path
        self.xs.write_all({
            f"{p}/feature-flush-cache": 1,
            f"{p}/feature-barrier": 1,
            f"{p}/feature-persistent": int(self.backend.persistent),
            f"{p}/feature-discard": int(dispatcher.can_discard),
            f"{p}/discard-granularity": dispatcher.discard_granularity,
            f"{p}/discard-alignment": 0,
            f"{p}/discard-secure": int(dispatcher.can_secure_discard),
            f"{p}/sectors": disk.size // abi.SECTOR_SIZE,
            f"{p}/sector-size": abi.SECTOR_SIZE,
            f"{p}/physical-sector-size": abi.SECTOR_SIZE,
            f"{p}/info": info,
            f"{p}/state": XenbusStateConnected})
        self.state = XenbusStateConnected
        log.info("%s: connected to domain %d (%s, %s%d ring pages%s) "
                 "serving %s", self.path, domid, proto,
                 f"{nqueues} queues of " if nqueues > 1 else "", 1 << order,
                 ", persistent grants" if persistent else "",
                 self.key("physical-device-path"))

    def _serve_ring(self, domid, refs, order, port, persistent, protocol):
        transport = self.backend.transport_factory(domid, refs, order, port,
                                                   persistent=persistent)
        try:
            dispatcher = Dispatcher(self.disk, transport, protocol,
                                    readonly=self.readonly,
                                    workers=self.backend.workers)
        except BaseException:
            transport.close()
            raise
        thread = threading.Thread(target=self._serve, args=(dispatcher,),
                                  name=f"tapbridge {self.path}", daemon=True)
        self.serving.append((dispatcher, thread, transport))
        thread.start()

    def _serve(self, dispatcher):
        try:
            dispatcher.serve()
        except RingOverrun as e:
            log.error("%s: %s; ring halted", self.path, e)

    def disconnect(self):
        if not self.serving:
            return
        serving, self.serving = self.serving, []
        for dispatcher, _, _ in serving:
            dispatcher.stop()
        grants = 0
        for dispatcher, thread, transport in serving:
            thread.join()
            dispatcher.close()
            grants += len(getattr(transport, "grants", None) or ())
            transport.close()
        log.info("%s: disconnected, %d persistent grants unmapped",
                 self.path, grants)

    def fatal(self, message):
        """As xenbus_dev_fatal: say why under error/, then Closing."""
        log.error("%s: %s", self.path, message)
        home = self.path.split("/backend/", 1)[0]
        self.xs.write(f"{home}/error/backend/{self.path.split('/backend/')[1]}"
                      "/error", message)
        self.switch(XenbusStateClosing)

    def retire(self):
        self.disconnect()
        if self.disk is not None:
            self.disk.close()
            self.disk = None
        if self.frontend:
            self.xs.unwatch(f"{self.frontend}/state", self.path)
        self.retired = True


class VbdBackend:
    """Every block-tapbridge vbd of domain `domid`, until stop()."""

    def __init__(self, xs, transport_factory, domid=0,
                 workers=DEFAULT_WORKERS, persistent=True,
                 max_queues=min(MAX_QUEUES, os.cpu_count() or 1)):
        self.xs = xs
        self.transport_factory = transport_factory
        self.workers = workers
        self.persistent = persistent    # offer feature-persistent
        self.max_queues = max_queues
        self.root = f"/local/domain/{domid}/backend/vbd"
        self.devices = {}
        self._stop = threading.Event()

    def run(self):
        self.xs.watch(self.root, self.root)
        log.info("watching %s", self.root)
        try:
            while not self._stop.is_set():
                event = self.xs.next_event(0.5)
                # Events come in bursts (libxl writes a device's keys one
                # by one, a guest its own): take every one queued, then
                # look at each device they touch once.
                paths = []
                while event is not None:
                    for path in self.devices_of(*event):
                        if path not in paths:
                            paths.append(path)
                    event = self.xs.next_event(0)
                for path in paths:
                    self.update(path)
        finally:
            for device in self.devices.values():
                if not device.retired:
                    device.retire()

    def stop(self):
        self._stop.set()

    def devices_of(self, path, token):
        """The device directories a watch event may concern."""
        if token != self.root:          # a frontend's state: token is ours
            return [token] if token in self.devices else []
        parts = path[len(self.root):].strip("/").split("/")
        if len(parts) >= 2:
            return [f"{self.root}/{parts[0]}/{parts[1]}"]
        # A domain's or every device directory.
        existing = self._existing()
        return sorted(existing) + sorted(set(self.devices) - existing)

    def _existing(self):
        return {f"{self.root}/{fe}/{devid}"
                for fe in self.xs.list(self.root)
                for devid in self.xs.list(f"{self.root}/{fe}")}

    def update(self, path):
        device = self.devices.get(path)
        if self.xs.read(f"{path}/state") is None:   # removed
            if device is not None:
                if not device.retired:
                    device.retire()
                del self.devices[path]
            return
        if device is None:
            device = self.devices[path] = Device(self, path)
        try:
            device.update()
        except Exception as e:      # one device's trouble, not the daemon's
            log.error("%s: %s", path, e)
