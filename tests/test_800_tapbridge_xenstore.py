"""The vbd backend's xenstore state machine, against a xenstore server
speaking the real wire protocol (the same one Xen's own xenstore-read
and friends talk to here), with the toolstack's and the guest's sides
played as libxl and blkfront would."""

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from tapbridge.abi import BLKIF_OP_READ, BLKIF_OP_WRITE
from tapbridge.shm import ShmTransport
from tapbridge.vbd import Xenstore

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tapbridge"))
import xsserver  # noqa: E402
from tbharness import (Frontend, ShmDir, in_thread,  # noqa: E402
                       libxl_add_vbd, probe, sector_data, vbd_backend,
                       wait_for)
from tbharness import xs  # noqa: E402,F401 (a fixture)

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(sector_data(0, 4 * MiB // 512, 3))
    return str(path)


class Factory:
    """The transport factory a test gives the backend: records what the
    backend asked to map and bind, and serves it from a shm ring."""

    def __init__(self, shm):
        self.shm = shm
        self.calls = []
        self.persistent = []
        self.open = []

    def __call__(self, domid, refs, order, port, persistent=False):
        self.calls.append((domid, refs, order, port))
        self.persistent.append(persistent)
        transport = ShmTransport(self.shm.path, order, persistent)
        close = transport.close

        def closing():
            close()
            self.open.remove(transport)
        transport.close = closing
        self.open.append(transport)
        return transport


def state(xs, path):
    value = xs.read(f"{path}/state")
    return int(value) if value is not None else None


def hotplug_connected(xs, be, image, fmt="raw"):
    """What block-tapbridge add writes (its own tests run it for real)."""
    xs.write_all({f"{be}/physical-device-path": image,
                  f"{be}/tapbridge-format": fmt,
                  f"{be}/hotplug-status": "connected"})


def frontend_connects(xs, fe, refs, port=17, protocol="x86_64-abi",
                      state_=3, **other):
    """blkfront's talk_to_blkback: ring refs, event channel, protocol
    (and `other` keys, as a hostile guest pleases)."""
    keys = {"event-channel": port, "state": state_}
    if protocol is not None:
        keys["protocol"] = protocol
    if len(refs) == 1:
        keys["ring-ref"] = refs[0]
    else:
        keys["ring-page-order"] = len(refs).bit_length() - 1
        keys.update({f"ring-ref{i}": r for i, r in enumerate(refs)})
    keys.update({k.replace("_", "-"): v for k, v in other.items()})
    xs.write_all({f"{fe}/{k}": v for k, v in keys.items()})


def test_server_speaks_xs_wire_h(xs):
    values = probe()
    for name in dir(xsserver):
        if name.startswith("XS_"):
            assert getattr(xsserver, name) == values[name], name
    assert xsserver.XSD_SOCKMSG.size == values["xsd_sockmsg__sizeof"]
    assert xsserver.XENSTORE_PAYLOAD_MAX == values["XENSTORE_PAYLOAD_MAX"]
    # Xen's own client tools agree with it.
    env = dict(os.environ, XENSTORED_PATH=xs.path)
    subprocess.run(["xenstore-write", "backend/vbd/1/2/params",
                    "qcow2:/a,b:c"], env=env, check=True, timeout=30)
    out = subprocess.run(["xenstore-read", "/local/domain/0/backend/vbd/1/"
                          "2/params"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.stdout == "qcow2:/a,b:c\n"
    assert xs.read("/local/domain/0/backend/vbd/1/2/params") == \
        "qcow2:/a,b:c"


def test_watch_fires_on_registration_and_on_changes(xs):
    store = Xenstore(xs.path)
    store.watch("/a/b", "t")
    assert store.next_event(5) == ("/a/b", "t")
    xs.write("/a/b/c/d", 1)
    assert store.next_event(5) == ("/a/b/c/d", "t")
    xs.write("/a/x", 1)
    xs.rm("/a")                         # an ancestor goes
    assert store.next_event(5) == ("/a/b", "t")
    assert store.next_event(0.2) is None
    store.close()


def test_transaction_retries_on_eagain(xs):
    store = Xenstore(xs.path)
    xs.fail_commits = 3
    store.write_all({"/t/a": 1, "/t/b": 2})
    assert xs.tree("/t") == {"a": "1", "b": "2"}
    assert xs.fail_commits == 0
    store.close()


def test_new_device_goes_to_initwait_before_hotplug(xs, image, tmp_path):
    factory = Factory(ShmDir(tmp_path / "shm", 8))
    with vbd_backend(xs, factory):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        wait_for(lambda: state(xs, be) == 2, 10, "InitWait")
        keys = xs.tree(be)
        assert keys["feature-max-indirect-segments"] == "256"
        assert keys["max-ring-page-order"] == "4"
        assert "sectors" not in keys
        # The frontend is ready, but the hotplug script has not run.
        frontend_connects(xs, fe, [8])
        with pytest.raises(AssertionError):
            wait_for(lambda: state(xs, be) == 4, 0.5)
        assert factory.calls == []


def test_script_and_frontend_done_while_the_device_is_looked_at(
        xs, image, tmp_path, monkeypatch):
    """The hotplug script names the image and the frontend connects
    between our read of the image's path and our read of the states:
    the device still connects (it once went to Closing, "no image")."""
    from tapbridge.vbd import Device
    shm = ShmDir(tmp_path / "shm", 8)
    guest = Frontend(shm, 0, "x86_64-abi")
    key = Device.key
    done = []

    def key_then_race(device, name):
        value = key(device, name)
        if name == "physical-device-path" and value is None and \
                device.state == 2 and not done:
            done.append(name)
            hotplug_connected(xs, device.path, image)
            frontend_connects(xs, device.frontend, [901])
        return value

    monkeypatch.setattr(Device, "key", key_then_race)
    with vbd_backend(xs, Factory(shm)):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        wait_for(lambda: state(xs, be) == 4, 10, "Connected")
        assert done
    del guest


@pytest.mark.parametrize("order,protocol", [
    (0, "x86_64-abi"), (2, "x86_32-abi"), (1, None)])
def test_connects_and_serves_the_ring(xs, image, tmp_path, order, protocol):
    shm = ShmDir(tmp_path / "shm", 16)
    guest = Frontend(shm, order, protocol or "x86_32-abi")
    factory = Factory(shm)
    refs = [901, 17, 4242, 3][:1 << order]   # not in order, not adjacent
    with vbd_backend(xs, factory):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        wait_for(lambda: state(xs, be) == 2)
        hotplug_connected(xs, be, image)
        frontend_connects(xs, fe, refs, port=33, protocol=protocol)
        wait_for(lambda: state(xs, be) == 4, 10, "Connected")
        assert factory.calls == [(1, refs, order, 33)]
        keys = xs.tree(be)
        assert {k: keys[k] for k in (
            "sectors", "sector-size", "info", "feature-flush-cache",
            "feature-barrier", "feature-persistent", "feature-discard",
            "discard-granularity", "discard-secure")} == {
            "sectors": str(4 * MiB // 512), "sector-size": "512",
            "info": "0", "feature-flush-cache": "1", "feature-barrier": "1",
            "feature-persistent": "1", "feature-discard": "1",
            "discard-granularity": "4096", "discard-secure": "1"}
        xs.write(f"{fe}/state", 4)
        shm.fill(2, b"\x42" * 4096)
        guest.req(BLKIF_OP_WRITE, 1, 64, [(2, 0, 7)])
        guest.req(BLKIF_OP_READ, 2, 0, [(3, 0, 7)])
        guest.push()
        assert sorted(guest.get(2)) == [(1, 1, 0), (2, 0, 0)]
        assert shm.page(3) == sector_data(0, 8, 3)
    with open(image, "rb") as f:
        f.seek(64 * 512)
        assert f.read(4096) == b"\x42" * 4096


def test_frontend_already_connected_before_the_backend(xs, image, tmp_path):
    shm = ShmDir(tmp_path / "shm", 8)
    Frontend(shm, 0)
    factory = Factory(shm)
    be, fe = libxl_add_vbd(xs, f"raw:{image}", mode="r")
    hotplug_connected(xs, be, image)
    frontend_connects(xs, fe, [5], state_=4)    # skipped InitWait
    with vbd_backend(xs, factory):
        wait_for(lambda: state(xs, be) == 4, 10, "Connected")
        assert xs.read(f"{be}/info") == "4"         # VDISK_READONLY
        assert xs.read(f"{be}/feature-discard") == "0"


@pytest.mark.parametrize("offered,used", [
    ((True, 1), True), ((True, 0), False), ((True, None), False),
    ((False, 1), False)])
def test_persistent_grants_when_both_ends_offer_them(xs, image, tmp_path,
                                                     offered, used):
    """feature-persistent: ours at connect, the frontend's before; pages
    stay mapped while connected and are all unmapped at teardown."""
    ours, theirs = offered
    shm = ShmDir(tmp_path / "shm", 8)
    guest = Frontend(shm, 0)
    factory = Factory(shm)
    from tapbridge.vbd import VbdBackend, Xenstore
    store = Xenstore(xs.path)
    vbd = VbdBackend(store, factory, persistent=ours)
    with in_thread(vbd.run, vbd.stop):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        hotplug_connected(xs, be, image)
        extra = {} if theirs is None else {"feature_persistent": theirs}
        frontend_connects(xs, fe, [5], **extra)
        wait_for(lambda: state(xs, be) == 4, 10, "Connected")
        assert xs.read(f"{be}/feature-persistent") == str(int(ours))
        assert factory.persistent == [used]
        for i in range(3):
            guest.req(BLKIF_OP_READ, i, 8 * i, [(2, 0, 7), (3, 0, 7)])
            guest.push()
            assert guest.get(1) == [(i, BLKIF_OP_READ, 0)]
        (transport,) = factory.open
        assert transport.maps == (2 if used else 0)
        teardown_by_libxl(xs, be, fe)
        wait_for(lambda: not factory.open, 10, "transport closed")
        assert transport.unmaps == transport.maps
    store.close()


def test_multi_queue_serves_a_ring_per_queue(xs, image, tmp_path):
    """blkfront with two queues: queue-N/ring-ref and event-channel each,
    ring-page-order and protocol once; both rings serve the one image."""
    shms = {port: ShmDir(tmp_path / f"shm{port}", 8) for port in (40, 41)}
    guests = {port: Frontend(shm, 1) for port, shm in shms.items()}
    opened = []

    def factory(domid, refs, order, port, persistent=False):
        transport = ShmTransport(shms[port].path, order, persistent)
        opened.append((refs, order, port))
        return transport
    from tapbridge.vbd import VbdBackend, Xenstore
    store = Xenstore(xs.path)
    vbd = VbdBackend(store, factory, max_queues=2)
    with in_thread(vbd.run, vbd.stop):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        wait_for(lambda: state(xs, be) == 2)
        assert xs.read(f"{be}/multi-queue-max-queues") == "2"
        hotplug_connected(xs, be, image)
        keys = {"multi-queue-num-queues": 2, "ring-page-order": 1,
                "protocol": "x86_64-abi", "feature-persistent": 1}
        for q, (port, refs) in enumerate([(40, [7, 3]), (41, [9, 2])]):
            keys.update({f"queue-{q}/ring-ref0": refs[0],
                         f"queue-{q}/ring-ref1": refs[1],
                         f"queue-{q}/event-channel": port})
        xs.write_all({f"{fe}/{k}": v for k, v in keys.items()})
        xs.write(f"{fe}/state", 3)
        wait_for(lambda: state(xs, be) == 4, 10, "Connected")
        assert opened == [([7, 3], 1, 40), ([9, 2], 1, 41)]
        for i, (port, guest) in enumerate(guests.items()):
            guest.req(BLKIF_OP_READ, i, 8 * i, [(5, 0, 7)])
            guest.push()
            assert guest.get(1) == [(i, BLKIF_OP_READ, 0)]
            assert shms[port].page(5) == sector_data(8 * i, 8, 3)
    store.close()


def teardown_by_libxl(xs, be, fe):
    """xl block-detach: online=0 and state=5 together; the frontend
    follows the backend to Closing and then Closed."""
    xs.write_all({f"{be}/online": 0, f"{be}/state": 5})
    xs.write(f"{fe}/state", 5)
    xs.write(f"{fe}/state", 6)


def test_detach_closes_unmaps_and_unwatches(xs, image, tmp_path):
    shm = ShmDir(tmp_path / "shm", 8)
    Frontend(shm, 0)
    factory = Factory(shm)
    with vbd_backend(xs, factory):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        hotplug_connected(xs, be, image)
        frontend_connects(xs, fe, [5])
        wait_for(lambda: state(xs, be) == 4)
        assert len(factory.open) == 1
        assert (f"{fe}/state", be) in xs.watched()
        teardown_by_libxl(xs, be, fe)
        wait_for(lambda: state(xs, be) == 6, 10, "Closed")
        wait_for(lambda: not factory.open, 10, "transport closed")
        wait_for(lambda: (f"{fe}/state", be) not in xs.watched(), 10,
                 "frontend unwatched")
        # libxl then removes both directories; nothing comes back.
        xs.rm(be)
        xs.rm(fe)
        wait_for(lambda: xs.read(be + "/state") is None)
        assert len(factory.calls) == 1


def test_guest_reboot_reconnects_with_a_new_ring(xs, image, tmp_path):
    shm = ShmDir(tmp_path / "shm", 8)
    guest = Frontend(shm, 0)
    factory = Factory(shm)
    with vbd_backend(xs, factory):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        hotplug_connected(xs, be, image)
        frontend_connects(xs, fe, [5], port=10)
        wait_for(lambda: state(xs, be) == 4)
        xs.write(f"{fe}/state", 5)
        wait_for(lambda: state(xs, be) == 5, 10, "Closing")
        xs.write(f"{fe}/state", 6)
        wait_for(lambda: state(xs, be) == 6, 10, "Closed")
        wait_for(lambda: not factory.open)
        assert (f"{fe}/state", be) in xs.watched()      # online: stays
        guest.close()
        guest = Frontend(shm, 0, start=1000)            # the new kernel
        xs.write(f"{fe}/state", 1)
        wait_for(lambda: state(xs, be) == 2, 10, "InitWait again")
        frontend_connects(xs, fe, [77], port=11)
        wait_for(lambda: state(xs, be) == 4, 10, "reconnected")
        assert factory.calls == [(1, [5], 0, 10), (1, [77], 0, 11)]
        guest.req(BLKIF_OP_READ, 9, 0, [(1, 0, 7)])
        guest.push()
        assert guest.get(1) == [(9, BLKIF_OP_READ, 0)]


@pytest.mark.parametrize("keys,message", [
    ({"protocol": "arm-abi"}, "unknown protocol 'arm-abi'"),
    ({"ring_page_order": 5}, "ring-page-order 5 is above 4"),
    ({"multi_queue_num_queues": 9}, "multi-queue-num-queues 9: 2 were"),
    ({"ring_ref": "0x10"}, "ring-ref: '0x10' is not a number"),
    ({"event_channel": "-1"}, "event-channel: '-1' is not a number"),
    ({"event_channel": 2 ** 32}, "is not a number"),
])
def test_bad_frontend_keys_close_the_device(xs, image, tmp_path, keys,
                                            message):
    factory = Factory(ShmDir(tmp_path / "shm", 8))
    with vbd_backend(xs, factory):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        hotplug_connected(xs, be, image)
        frontend_connects(xs, fe, [5], **keys)
        wait_for(lambda: state(xs, be) == 5, 10, "Closing")
        assert message in xs.read(
            "/local/domain/0/error/backend/vbd/1/51712/error")
        assert factory.calls == []


def test_guest_writing_garbage_state_loses_only_its_device(xs, image,
                                                           tmp_path):
    factory = Factory(ShmDir(tmp_path / "shm", 8))
    with vbd_backend(xs, factory):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        wait_for(lambda: state(xs, be) == 2)
        xs.write(f"{fe}/state", "3; rm -rf /")
        wait_for(lambda: state(xs, be) == 6, 10, "Closed")
        be2, _ = libxl_add_vbd(xs, f"raw:{image}", domid=2)
        wait_for(lambda: state(xs, be2) == 2, 10, "the next device")


def test_image_that_will_not_open_closes_the_device(xs, tmp_path):
    factory = Factory(ShmDir(tmp_path / "shm", 8))
    with vbd_backend(xs, factory):
        be, fe = libxl_add_vbd(xs, f"qcow2:{tmp_path}/missing.qcow2")
        hotplug_connected(xs, be, f"{tmp_path}/missing.qcow2", "qcow2")
        frontend_connects(xs, fe, [5])
        wait_for(lambda: state(xs, be) == 5, 10, "Closing")
        assert "missing.qcow2" in xs.read(
            "/local/domain/0/error/backend/vbd/1/51712/error")
        assert factory.calls == []


def test_devices_of_other_scripts_are_left_alone(xs, image, tmp_path):
    factory = Factory(ShmDir(tmp_path / "shm", 8))
    with vbd_backend(xs, factory):
        be, _ = libxl_add_vbd(xs, image, script="/etc/xen/scripts/block")
        be2, _ = libxl_add_vbd(xs, f"raw:{image}", devid=51728)
        wait_for(lambda: state(xs, be2) == 2)
        assert state(xs, be) == 1


def test_serve_xen_command(xs, image):
    """The daemon as xl's dom0 runs it: InitWait for a new device, and
    without a hypervisor the connect fails on the Xen devices, in one line
    under error/ and Closing; SIGTERM ends it."""
    proc = subprocess.Popen([sys.executable, "-m", "tapbridge.cli",
                             "serve-xen", "--xenstore", xs.path],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        wait_for(lambda: state(xs, be) == 2, 10, "InitWait")
        hotplug_connected(xs, be, image)
        frontend_connects(xs, fe, [5])
        wait_for(lambda: state(xs, be) == 5, 10, "Closing")
        assert "/dev/xen/gntdev" in xs.read(
            "/local/domain/0/error/backend/vbd/1/51712/error")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "Traceback" not in proc.stderr.read()
