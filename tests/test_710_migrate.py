"""`nbdplug migrate` on one host: the record that lets a remote backing
through, copy-on-read and the fill against a real nbdkit source, the
races a store must lose to a guest write, the source going away, cancel,
resume and completion, checked with qemu-img."""

import json
import os
import random
import threading
import time

import pytest

from conftest import nbdplug, qemu_img_check_clean, qemu_img_info, run
from migration import MiB, SourceServer, source_image
from nbdplug import opener
from nbdplug.errors import ImageError
from nbdplug.formats.qcow2 import fill
from nbdplug.opener import open_image
from nbdplug.ops import migrate


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """A host key of this test's own (subprocesses inherit it)."""
    monkeypatch.setenv("NBDPLUG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(opener, "SOURCE_PATIENCE", 1.0)
    return tmp_path / "state"


@pytest.fixture
def source(tmp_path):
    path, model = source_image(str(tmp_path), "raw")
    with SourceServer(path, "raw") as srv:
        srv.model = model
        yield srv


def read_all(disk):
    return bytes(disk.read(disk.size, 0))


def assert_model(disk, model):
    data = read_all(disk)
    for off in range(0, len(model), MiB):
        assert data[off:off + MiB] == model[off:off + MiB], \
            f"MiB at {off} differs"


def allocated_source_bytes(model, cluster=65536):
    return sum(cluster for off in range(0, len(model), cluster)
               if any(model[off:off + cluster]))


def start(source, local, *args):
    nbdplug("migrate", "start", *args, source.uri, local)


# --- the record and the open policy ----------------------------------

def test_start_records_source_and_only_it_opens(source, tmp_path):
    local = str(tmp_path / "local.qcow2")
    start(source, local, "--no-wait")
    info = qemu_img_info(local)
    assert info["virtual-size"] == len(source.model)
    assert info["backing-filename"] == source.uri
    assert info["backing-filename-format"] == "raw"
    st = json.loads(nbdplug("migrate", "status", "--output=json",
                            local).stdout)
    assert st["state"] == "filling" and st["source_reachable"] is True
    facts = json.loads(nbdplug("info", "--output=json", local).stdout)
    assert facts["format-specific"]["data"]["migration"] == "filling"
    assert facts["backing-filename"] == source.uri
    with open_image(local) as disk:            # read-only: no fill, no store
        assert_model(disk, source.model)
    assert migrate.status(local)["fetched"] is None

    proc = nbdplug("info", "--no-backing", local, check=False)
    assert proc.returncode == 2 and "--no-backing" in proc.stderr
    # The same backing name written by anyone else is refused ...
    foreign = str(tmp_path / "foreign.qcow2")
    run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", source.uri,
         "-F", "raw", foreign, "24M"])
    proc = nbdplug("info", foreign, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "remote export" in proc.stderr and "migrate" in proc.stderr
    # ... and so is a record another host's key made.
    other = tmp_path / "other-host"
    proc = nbdplug("info", local, check=False,
                   env=dict(os.environ, NBDPLUG_STATE_DIR=str(other)))
    assert proc.returncode == 2 and "remote export" in proc.stderr
    # A record does not vouch for a backing name changed after it.
    run(["qemu-img", "rebase", "-u", "-b", source.uri + "&x=1", "-F", "raw",
         local])
    proc = nbdplug("info", local, check=False)
    assert proc.returncode == 2 and "remote export" in proc.stderr


def test_start_refuses_existing_and_bad_source(source, tmp_path):
    local = tmp_path / "local.qcow2"
    local.write_bytes(b"x")
    proc = nbdplug("migrate", "start", source.uri, local, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = nbdplug("migrate", "start", "nbd+unix:///?socket=/nonexistent",
                   tmp_path / "b.qcow2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "b.qcow2").exists()
    assert [p for p in os.listdir(tmp_path) if p.endswith(".new")] == []
    # nbdkit's memory plugin as the source, at a size qcow2 cannot hold.
    import shlex
    from conftest import NBDPLUG, REPO
    cmd = " ".join(shlex.quote(a) for a in NBDPLUG) + \
        f' migrate start "$uri" {tmp_path}/odd.qcow2'
    proc = run(["nbdkit", "-U", "-", "memory", "size=1000", "--run", cmd],
               check=False, cwd=REPO)
    assert proc.returncode == 2 and "multiple of 512" in proc.stderr


# --- a full move ------------------------------------------------------

def test_move_completes_and_drops_the_source(source, tmp_path):
    local = str(tmp_path / "local.qcow2")
    start(source, local, "-p")
    info = qemu_img_info(local)
    assert "backing-filename" not in info
    qemu_img_check_clean(local)
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", source.image,
         local])
    st = migrate.status(local)
    assert st["state"] == "done"
    allocated = allocated_source_bytes(source.model)
    # Holes and zero ranges are neither fetched nor allocated.
    assert allocated <= st["fetched"] <= allocated + 2 * MiB
    assert info["actual-size"] < allocated + 4 * MiB
    source.stop()                   # no tie left
    with open_image(local) as disk:
        assert_model(disk, source.model)
    assert "state: done" in nbdplug("migrate", "status", local).stdout


def test_local_source_of_another_format(tmp_path):
    path, model = source_image(str(tmp_path), "vmdk")
    local = str(tmp_path / "sub" / "local.qcow2")
    os.mkdir(tmp_path / "sub")              # the source is outside its dir
    nbdplug("migrate", "start", path, local)
    assert "backing-filename" not in qemu_img_info(local)
    run(["qemu-img", "compare", "-f", "vmdk", "-F", "qcow2", path, local])
    qemu_img_check_clean(local)


# --- copy-on-read and the races -------------------------------------------

def moving(source, tmp_path, **kw):
    local = str(tmp_path / "local.qcow2")
    start(source, local, "--no-wait")
    return open_image(local, "qcow2", readonly=False,
                      options={"fill": False}), local


def test_copy_on_read_stores_whole_clusters(source, tmp_path):
    disk, local = moving(source, tmp_path)
    with disk:
        buf = bytearray(4096)
        disk.pread(memoryview(buf), 3 * MiB + 8192)
        assert buf == source.model[3 * MiB + 8192:3 * MiB + 12288]
        assert disk.move.source.fetched == 65536
        disk.pread(memoryview(buf), 3 * MiB + 4096)      # now local
        assert disk.move.source.fetched == 65536
    source.stop()
    with open_image(local) as disk:
        runs = disk.map(65536, 3 * MiB)
        assert [r.depth for r in runs] == [0]
        assert bytes(disk.read(65536, 3 * MiB)) == \
            source.model[3 * MiB:3 * MiB + 65536]


def test_staged_fill_store_holds_readers_and_writers_until_committed(
        source, tmp_path):
    """The fill writes a batch's clusters, and points at them only after
    the flush of a later commit: meanwhile a reader of one waits (it does
    not fetch it again) and so does a guest write to part of it; after
    the commit both see the right bytes."""
    disk, local = moving(source, tmp_path)
    model = bytearray(source.model)
    first = next(c for c in range(len(model) >> 16) if all(
        any(model[x << 16:(x + 1) << 16]) for x in range(c, c + 4)))
    with disk:
        move = disk.move
        claimed = move._claim(first, 4, wait=False)
        assert claimed == [(first, 4)]
        staged = move._stage(move._fetch(move.source, claimed), claimed,
                             streaming=True)
        assert disk.map(65536, first << 16)[0].depth == 1   # not yet
        got = []
        reader = threading.Thread(target=lambda: got.append(
            bytes(disk.read(4096, (first + 1) << 16))))
        writer = threading.Thread(target=lambda: disk.pwrite(
            b"\xab" * 512, ((first + 2) << 16) + 512))
        model[((first + 2) << 16) + 512:((first + 2) << 16) + 1024] = \
            b"\xab" * 512
        reader.start()
        writer.start()
        reader.join(0.3)
        writer.join(0.3)
        assert reader.is_alive() and writer.is_alive()
        move._commit([staged])
        reader.join(10)
        writer.join(10)
        assert got == [model[(first + 1) << 16:((first + 1) << 16) + 4096]]
        assert move.source.fetched == 4 * 65536         # once
        assert bytes(disk.read(4 * 65536, first << 16)) == \
            model[first << 16:(first + 4) << 16]
    qemu_img_check_clean(local)


def test_store_loses_to_newer_guest_write(source, tmp_path):
    """Copy-on-read fetches a cluster; a guest write to part of it lands
    before the store: the guest's bytes stay, the rest is the source's."""
    disk, local = moving(source, tmp_path)
    model = bytearray(source.model)
    cluster = 9 * MiB
    with disk:
        src = disk.backing
        fetched, written = threading.Event(), threading.Event()
        real = src.pread

        def slow_pread(buf, offset, **kw):
            real(buf, offset, **kw)
            if not fetched.is_set():    # the copy-on-read (the guest's
                fetched.set()           # write reads the rest after it)
                assert written.wait(10)

        src.pread = slow_pread
        guest = b"\xee" * 1024
        model[cluster + 2048:cluster + 3072] = guest

        def writer():
            assert fetched.wait(10)
            disk.pwrite(guest, cluster + 2048)
            written.set()

        t = threading.Thread(target=writer)
        t.start()
        buf = bytearray(65536)
        disk.pread(memoryview(buf), cluster)
        t.join()
        assert bytes(buf) == model[cluster:cluster + 65536]
        # The fill's store of a stale fetch loses the same way.
        stale = bytearray(source.model[cluster + 65536:cluster + 131072])
        disk.pwrite(b"\xdd" * 512, cluster + 65536 + 512)
        model[cluster + 65536 + 512:cluster + 65536 + 1024] = b"\xdd" * 512
        disk.move.store([((cluster + 65536) >> 16, stale)])
        disk.flush()
    source.stop()
    with open_image(local) as disk:
        assert bytes(disk.read(2 * 65536, cluster)) == \
            model[cluster:cluster + 2 * 65536]


def test_partial_write_copies_rest_trim_and_zero_need_no_source(source,
                                                                tmp_path):
    disk, local = moving(source, tmp_path)
    model = bytearray(source.model)
    base = 3 * MiB + 4096
    with disk:
        disk.pwrite(b"\x11" * 512, base + 512)          # part of a cluster
        model[base + 512:base + 1024] = b"\x11" * 512
        fetched = disk.move.source.fetched
        assert fetched == 65536          # the cluster, read once
        source.stop()                   # nothing below may need it
        disk.trim(2 * 65536, 9 * MiB)
        disk.zero(65536, 9 * MiB + 2 * 65536)
        model[9 * MiB:9 * MiB + 3 * 65536] = bytes(3 * 65536)
        disk.flush()
        assert disk.move.source.fetched == fetched
        assert bytes(disk.read(3 * 65536, 9 * MiB)) == bytes(3 * 65536)
        c = base & ~0xFFFF
        assert bytes(disk.read(65536, c)) == model[c:c + 65536]
    source.start()
    migrate.resume(local)
    with open_image(local) as disk:
        assert_model(disk, model)
    qemu_img_check_clean(local)


# --- the source away ---------------------------------------------------------

def test_source_away_eio_bounded_then_back(source, tmp_path):
    local = str(tmp_path / "local.qcow2")
    start(source, local, "--no-wait")
    with open_image(local, "qcow2", readonly=False) as disk:
        disk.pread(memoryview(bytearray(4096)), 0)       # local from now
        source.kill()
        t0 = time.monotonic()
        with pytest.raises(ImageError) as e:
            disk.pread(memoryview(bytearray(4096)), 9 * MiB)
        waited = time.monotonic() - t0
        assert 0.9 <= waited < 5, waited
        assert e.value.errno == 5 and "unreachable" in str(e.value)
        # What is local still reads, and writes still land.
        assert bytes(disk.read(4096, 0)) == source.model[:4096]
        disk.pwrite(b"\x42" * 65536, 20 * MiB)
        deadline = time.monotonic() + 10
        while migrate.status(local)["state"] != "paused":
            assert time.monotonic() < deadline, migrate.status(local)
            time.sleep(0.1)
        assert migrate.status(local)["source_reachable"] is False
        source.start()
        assert disk.move.wait(30), migrate.status(local)
        model = bytearray(source.model)
        model[20 * MiB:20 * MiB + 65536] = b"\x42" * 65536
        assert_model(disk, model)
    assert migrate.status(local)["state"] == "done"
    assert "backing-filename" not in qemu_img_info(local)


# --- cancel, kill -9 and resume -------------------------------------------

def test_cancel_keeps_source_and_resume_finishes(source, tmp_path):
    local = str(tmp_path / "local.qcow2")
    start(source, local, "--no-wait")
    with open_image(local, "qcow2", readonly=False) as disk:
        disk.pread(memoryview(bytearray(4096)), 0)
    nbdplug("migrate", "cancel", local)
    assert qemu_img_info(local)["backing-filename"] == source.uri
    qemu_img_check_clean(local)
    assert migrate.status(local)["state"] == "cancelled"
    with open_image(local, "qcow2", readonly=False) as disk:
        fetched = disk.move.source.fetched
        assert_model(disk, source.model)    # reads pass through, not stored
        assert disk.move.thread is None
    nbdplug("migrate", "resume", local)
    assert migrate.status(local)["state"] == "done"
    assert "backing-filename" not in qemu_img_info(local)
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", source.image,
         local])
    assert fetched == 0


def test_kill_filler_then_resume(source, tmp_path):
    """kill -9 of a `migrate start` at random points; resume finishes and
    fetches each cluster about once."""
    local = str(tmp_path / "local.qcow2")
    rng = random.Random(1)
    proc = None
    for round in range(int(os.environ.get("NBDPLUG_MIGRATE_ROUNDS", "3"))):
        new = not os.path.exists(local)     # killed before it was made
        argv = ["migrate", "start" if new else "resume",
                "--rate", "3M"] + ([source.uri] if new else [])
        proc = nbdplug_popen(*argv, local)
        time.sleep(rng.uniform(0.1, 0.6))
        proc.kill()
        proc.wait()
        if os.path.exists(local):
            qemu_img_check_clean_leaks_ok(local)
    if not os.path.exists(local):
        start(source, local, "--no-wait")
    nbdplug("migrate", "resume", local)
    # A start killed before its rename leaves its temporary file; the
    # next start takes it away.
    assert [p for p in os.listdir(tmp_path) if p.endswith(".new")] == []
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", source.image,
         local])
    qemu_img_check_clean(local)
    allocated = allocated_source_bytes(source.model)
    assert migrate.status(local)["fetched"] <= allocated + 2 * MiB


def nbdplug_popen(*args):
    import subprocess
    from conftest import NBDPLUG, REPO
    return subprocess.Popen(NBDPLUG + [str(a) for a in args], cwd=REPO,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def qemu_img_check_clean_leaks_ok(image):
    """After a crash: no corruption (leaked clusters are allowed)."""
    proc = run(["qemu-img", "check", "-U", "--output=json", "-f", "qcow2",
                image], check=False)
    assert proc.stdout, proc.stderr
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report


def test_status_of_a_plain_image(tmp_path):
    img = str(tmp_path / "plain.qcow2")
    run(["qemu-img", "create", "-f", "qcow2", img, "1M"])
    assert "state: none" in nbdplug("migrate", "status", img).stdout
    proc = nbdplug("migrate", "resume", img, check=False)
    assert proc.returncode == 2 and "no move in progress" in proc.stderr
    assert fill.read_status(img) is None


# --- another caller: tapbridge's blkif ring -------------------------------

def test_tapbridge_serves_a_moving_disk(source, tmp_path):
    """The ring reads the source through copy-on-read and writes land
    locally; the move then completes under `migrate resume`."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tapbridge"))
    from tbharness import Backend, Frontend, ShmDir, sector_data
    from tapbridge.abi import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY
    local = str(tmp_path / "local.qcow2")
    start(source, local, "--no-wait")
    model = bytearray(source.model)
    shm = ShmDir(tmp_path / "shm", 16)
    fe = Frontend(shm)
    be = Backend(shm, local, fmt="qcow2")
    segs = [(g, 0, 7) for g in range(8)]           # 32 KiB
    try:
        for req, sector in enumerate((3 * MiB // 512 + 8, 9 * MiB // 512,
                                      18 * MiB // 512 + 3)):
            fe.req(BLKIF_OP_READ, 2 * req, sector, segs)
            fe.push()
            assert fe.get(1)[0][2] == BLKIF_RSP_OKAY
            off = sector * 512
            assert shm.gather(segs) == model[off:off + 32768], off
            for g in range(8):
                shm.fill(g, sector_data(sector + 8 * g, 8, req))
            fe.req(BLKIF_OP_WRITE, 2 * req + 1, sector + 64, segs)
            fe.push()
            assert fe.get(1)[0][2] == BLKIF_RSP_OKAY
            model[off + 32768:off + 65536] = shm.gather(segs)
    finally:
        assert be.stop()[0] == 0
        fe.close()
        shm.close()
    nbdplug("migrate", "resume", local)
    source.stop()
    with open_image(local) as disk:
        assert_model(disk, model)
    qemu_img_check_clean(local)
