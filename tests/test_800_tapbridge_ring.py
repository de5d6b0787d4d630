"""The blkif ring served by `tapbridge serve-shm`, driven by a C frontend
built on Xen's ring.h macros: ring orders 0-4, both protocols, indices
wrapping past 2**32, a full ring in flight, event suppression both ways,
and a frontend that overruns the ring."""

import os
import struct
import sys
import time

import pytest

from tapbridge.abi import (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_ERROR,
                           BLKIF_RSP_EOPNOTSUPP, SRING_HEADER)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tapbridge"))
from tbharness import Backend, Frontend, ShmDir, sector_data  # noqa: E402

MiB = 1 << 20
PROTOCOLS = ["x86_64-abi", "x86_32-abi"]
WRAP = 2 ** 32 - 7          # a start index that wraps within one ring


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    return path


def setup(tmp_path, image, order=0, protocol="x86_64-abi", start=0,
          pages=None, **kw):
    size = 32 << order
    shm = ShmDir(tmp_path / "shm", pages or size + 8)
    fe = Frontend(shm, order, protocol, start)
    be = Backend(shm, image, order=order, protocol=protocol, **kw)
    return shm, fe, be


def full_ring_round(shm, fe, size, seed):
    """A ring's worth of writes in flight at once (page k to sector 8k),
    then a ring's worth of reads of them into fresh pages."""
    for k in range(size):
        shm.fill(k, sector_data(8 * k, 8, seed))
    for k in range(size):
        fe.req(BLKIF_OP_WRITE, (seed << 32) | k, 8 * k, [(k, 0, 7)])
    assert fe.free() == 0           # RING_FULL: every slot in flight
    fe.push()
    rsps = fe.get(size)
    assert sorted(rsps) == [((seed << 32) | k, BLKIF_OP_WRITE, 0)
                            for k in range(size)]
    for k in range(size):
        shm.fill(k, b"\xee" * 4096)
        fe.req(BLKIF_OP_READ, k, 8 * k, [(k, 0, 7)])
    fe.push()
    assert sorted(fe.get(size)) == [(k, BLKIF_OP_READ, 0)
                                    for k in range(size)]
    for k in range(size):
        assert shm.page(k) == sector_data(8 * k, 8, seed), f"page {k}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("order", range(5))
def test_full_ring_in_flight(tmp_path, image, order, protocol):
    size = 32 << order
    shm, fe, be = setup(tmp_path, image, order, protocol)
    assert f"{protocol}, {size} entries" in be.banner
    full_ring_round(shm, fe, size, seed=order + 1)
    assert be.stop() == (0, "")
    with open(image, "rb") as f:
        data = f.read(size * 4096)
    for k in range(size):
        assert data[k * 4096:(k + 1) * 4096] == \
            sector_data(8 * k, 8, order + 1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_indices_wrap_past_2_32(tmp_path, image, protocol):
    shm, fe, be = setup(tmp_path, image, 0, protocol, start=WRAP)
    assert "from index 4294967289" in be.banner
    for seed in range(3):
        full_ring_round(shm, fe, 32, seed)
    st = fe.state()
    assert st["req_prod"] == st["rsp_prod"] == (WRAP + 6 * 32) % 2 ** 32
    assert be.stop()[0] == 0


def test_responses_byte_exact_in_slots(tmp_path, image):
    """id echoed bit-exactly; status a little-endian int16 at offset 10
    of the slot the request used."""
    shm, fe, be = setup(tmp_path, image)
    fe.req(BLKIF_OP_READ, 0xDEADBEEFCAFEF00D, 0, [(0, 0, 7)])
    fe.req(BLKIF_OP_READ, 0x0123456789ABCDEF, 0, [(0, 0, 7)], nseg=0)
    fe.req(7, 0xFEEDFACE00000001, 0, [])
    fe.push()
    assert sorted(fe.get(3)) == sorted([
        (0xDEADBEEFCAFEF00D, BLKIF_OP_READ, 0),
        (0x0123456789ABCDEF, BLKIF_OP_READ, BLKIF_RSP_ERROR),
        (0xFEEDFACE00000001, 7, BLKIF_RSP_EOPNOTSUPP)])
    ring = shm.ring_bytes()
    slots = [ring[64 + 112 * i:64 + 112 * i + 16] for i in range(3)]
    by_id = {s[:8]: s for s in slots}
    assert by_id[struct.pack("<Q", 0x0123456789ABCDEF)][8:12] == \
        b"\x00\x00\xff\xff"
    assert by_id[struct.pack("<Q", 0xFEEDFACE00000001)][8:12] == \
        b"\x07\x00\xfe\xff"
    be.stop()


def test_idle_backend_asks_for_the_next_request(tmp_path, image):
    """Before sleeping the backend sets req_event = req_cons + 1, so each
    later batch notifies it (a backend that never does stalls here)."""
    shm, fe, be = setup(tmp_path, image, start=WRAP)
    for batch in range(4):
        fe.req(BLKIF_OP_READ, batch, 0, [(0, 0, 7)])
        assert fe.push(), f"batch {batch} needed no notification?"
        assert fe.get(1) == [(batch, BLKIF_OP_READ, 0)]
        deadline = time.monotonic() + 10
        while fe.state()["req_event"] != (fe.state()["req_prod"] + 1) \
                % 2 ** 32:
            assert time.monotonic() < deadline, fe.state()
            time.sleep(0.01)
    be.stop()


def test_notifies_only_when_the_frontend_asks(tmp_path, image):
    shm, fe, be = setup(tmp_path, image)
    fe.req(BLKIF_OP_READ, 1, 0, [(0, 0, 7)])
    fe.push()
    fe.get(1)                           # final check: rsp_event = cons + 1
    kicks = fe.state()["kicks"]
    # Suppressed: the frontend wants no notification for 1000 responses.
    fe.poke(3, (fe.state()["rsp_cons"] + 1000) % 2 ** 32)
    for i in range(5):
        fe.req(BLKIF_OP_READ, 10 + i, 0, [(0, 0, 7)])
    fe.push()
    got, deadline = [], time.monotonic() + 20
    while len(got) < 5:
        assert time.monotonic() < deadline, got
        got += fe.poll()
        time.sleep(0.005)
    assert fe.state()["kicks"] == kicks
    # Armed again: the next response notifies.
    assert fe.final() == 0
    fe.req(BLKIF_OP_READ, 20, 0, [(0, 0, 7)])
    fe.push()
    assert fe.get(1) == [(20, BLKIF_OP_READ, 0)]
    assert fe.state()["kicks"] > kicks
    be.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_frontend_overrunning_the_ring_halts_it(tmp_path, image, protocol):
    shm, fe, be = setup(tmp_path, image, protocol=protocol)
    fe.req(BLKIF_OP_READ, 1, 0, [(0, 0, 7)])
    fe.push()
    assert fe.get(1) == [(1, BLKIF_OP_READ, 0)]
    st = fe.state()
    fe.poke(0, st["rsp_prod"] + 33)     # 33 requests in a 32-entry ring
    fe.send("kick")
    rc, err = be.proc.wait(30), be.proc.stderr.read()
    assert rc == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "ring halted" in err and "32 requests" in err


def test_attaching_to_an_overrun_ring_is_refused(tmp_path, image):
    shm = ShmDir(tmp_path / "shm", 8)
    fe = Frontend(shm, 0)
    fe.poke(0, 40)
    assert fe.state()["req_prod"] == 40
    with pytest.raises(AssertionError, match="more than the 32"):
        Backend(shm, image)


def test_attaches_at_the_rings_current_indices(tmp_path, image):
    shm = ShmDir(tmp_path / "shm", 8)
    fe = Frontend(shm, 0, start=123456)
    be = Backend(shm, image)
    assert "from index 123456" in be.banner
    fe.req(BLKIF_OP_READ, 5, 0, [(0, 0, 7)])
    fe.push()
    assert fe.get(1) == [(5, BLKIF_OP_READ, 0)]
    be.stop()


@pytest.mark.parametrize("args,message", [
    (["--order", "5"], "--order 5: expected 0 to 4"),
    (["--order", "1"], "expected 8192 for this ring order"),
    (["--protocol", "arm-abi"], "invalid choice"),
])
def test_bad_command_lines_are_one_line_errors(tmp_path, image, args,
                                               message):
    import subprocess
    shm = ShmDir(tmp_path / "shm", 8)
    Frontend(shm, 0).close()
    proc = subprocess.run([sys.executable, "-m", "tapbridge.cli",
                           "serve-shm", shm.path, str(image), "-f", "raw",
                           *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("\n") == 1


def test_ring_header_is_left_to_the_frontend(tmp_path, image):
    """The backend never re-initialises the ring: the frontend's pad bytes
    and indices survive attaching."""
    shm = ShmDir(tmp_path / "shm", 8)
    Frontend(shm, 0, start=77)
    before = shm.ring_bytes()[:SRING_HEADER.size]
    be = Backend(shm, image)
    assert shm.ring_bytes()[:SRING_HEADER.size] == before
    assert SRING_HEADER.unpack_from(before).req_event == 78
    be.stop()
