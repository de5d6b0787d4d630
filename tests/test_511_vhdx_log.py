"""VHDX logs replayed into memory: a log qemu left behind (its metadata
write failed after the log entry was durable) and sequences built here,
read as the replayed image, the file never modified; qemu's own replay of
a copy agrees."""

import hashlib
import shutil
import struct

import pytest

from conftest import run
from test_500_vhd import qemu_raw, read_all
from test_510_vhdx import qemu_vhdx, with_crc

KiB, MiB = 1 << 10, 1 << 20
LOG = MiB                       # qemu puts a 1 MiB log at 1 MiB


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), \
        path.stat().st_mtime_ns


def qemu_replayed(path, tmp_path):
    """What qemu reads once it has replayed the log of a copy (it replays
    only when it may write)."""
    copy = tmp_path / "qemu-copy.vhdx"
    shutil.copy(path, copy)
    run(["qemu-img", "check", "-q", "-r", "all", "-f", "vhdx", str(copy)])
    return qemu_raw(copy, "vhdx")


def qemu_crash(path, tmp_path, failing_from):
    """Run a qemu-io write that allocates a block, every write of qemu's
    failing from its `failing_from`-th on (a crash, as the file sees it)."""
    rules = [f'[set-state]\nevent = "pwritev"\nstate = "{i}"\n'
             f'new_state = "{i + 1}"\n' for i in range(1, failing_from)]
    rules += [f'[inject-error]\nevent = "pwritev"\nstate = "{i}"\n'
              'errno = "5"\n' for i in range(failing_from, failing_from + 64)]
    cfg = tmp_path / "blkdebug.cfg"
    cfg.write_text("\n".join(rules))
    run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x22 3M 64k",
         f"blkdebug:{cfg}:{path}"], check=False)


def test_log_qemu_left_behind(tmp_path):
    """qemu writes its log entry, then the BAT; a crash between leaves a
    log qemu itself will only read after replaying it (which writes)."""
    path = tmp_path / "disk.vhdx"
    for failing_from in range(4, 16):
        qemu_vhdx(path, 16 * MiB, "block_size=1M", writes=[(0, MiB, 0x11)])
        qemu_crash(path, tmp_path, failing_from)
        refused = run(["qemu-img", "info", "-f", "vhdx", str(path)],
                      check=False)
        if "log that needs to be replayed" in refused.stderr:
            break
        path.unlink()
    else:
        pytest.fail("qemu never left a log behind")
    before = digest(path)
    ours = read_all(path, "vhdx")
    model = bytearray(16 * MiB)
    model[:MiB] = b"\x11" * MiB
    model[3 * MiB:3 * MiB + 64 * KiB] = b"\x22" * 64 * KiB
    assert ours == bytes(model)
    assert digest(path) == before
    assert qemu_replayed(path, tmp_path) == ours


# --- building log entries ----------------------------------------------------

def log_entry(seq, tail, log_guid, writes=(), zeros=(), flushed=0,
              last=64 * MiB, damage=None):
    """One log entry: data descriptors for `writes` [(offset, 4 KiB)] and
    zero descriptors for `zeros` [(offset, length)]."""
    count = len(writes) + len(zeros)
    desc_sectors = -(-(64 + 32 * count) // 4096)
    length = (desc_sectors + len(writes)) * 4096
    head = struct.pack("<4sIIIQII16sQQ", b"loge", 0, length, tail, seq,
                       count, 0, log_guid, flushed, last)
    descs, sectors = b"", b""
    for offset, data in writes:
        descs += struct.pack("<4s4s8sQQ", b"desc", data[-4:], data[:8],
                             offset, seq)
        signature = b"data" if damage != "data" else b"dat!"
        sectors += struct.pack("<4sI4084sI", signature, seq >> 32,
                               data[8:-4], seq & 0xFFFFFFFF)
    for offset, n in zeros:
        descs += struct.pack("<4sIQQQ", b"zero", 0, n, offset, seq)
    entry = (head + descs).ljust(desc_sectors * 4096, b"\0") + sectors
    return with_crc(entry) if damage != "crc" else entry


def put_log(path, entries, log_guid):
    """Write entries [(position in the log, bytes)] into the log region
    (wrapping at its end) and name `log_guid` in both headers."""
    data = bytearray(path.read_bytes())
    for pos, entry in entries:
        for i in range(0, len(entry), 4096):
            at = LOG + (pos + i) % LOG
            data[at:at + 4096] = entry[i:i + 4096]
    for at in (64 * KiB, 128 * KiB):
        data[at + 48:at + 64] = log_guid
        data[at:at + 4096] = with_crc(data[at:at + 4096])
    path.write_bytes(data)


GUID = bytes(range(1, 17))


@pytest.fixture
def image(tmp_path):
    """A qemu-written dynamic VHDX with 1 MiB blocks (BAT at 2 MiB) and
    its bytes."""
    path = tmp_path / "disk.vhdx"
    qemu_vhdx(path, 8 * MiB, "block_size=1M",
              writes=[(0, 2 * MiB, 0x11), (5 * MiB, MiB, 0x55)])
    return path, bytearray(qemu_raw(path, "vhdx"))


def bat_page_with(path, index, entry):
    """The BAT's first 4 KiB with entry `index` replaced."""
    page = bytearray(path.read_bytes()[2 * MiB:2 * MiB + 4096])
    struct.pack_into("<Q", page, 8 * index, entry)
    return bytes(page)


def block_offset(path, index):
    entry = struct.unpack_from("<Q", path.read_bytes(), 2 * MiB + 8 * index)
    return (entry[0] >> 20) * MiB


def test_two_entries_replayed_as_qemu_replays_them(image, tmp_path):
    path, model = image
    b0, b5 = block_offset(path, 0), block_offset(path, 5)
    page = b"\xab" * 4096
    first = log_entry(5, 0, GUID, writes=[(b0 + 8192, page)],
                      zeros=[(b5 + 64 * KiB, 128 * KiB)])
    # The second entry moves block 5's data to block 6 and unmaps 5.
    second = log_entry(6, 0, GUID, writes=[
        (2 * MiB, bat_page_with(path, 5, 0) [:48] +
         struct.pack("<Q", 6 | (b5 // MiB) << 20) +
         bat_page_with(path, 5, 0)[56:])])
    stale = log_entry(3, 0, GUID, writes=[(b0, b"\xee" * 4096)])
    put_log(path, [(0, first), (len(first), second),
                   (512 * KiB, stale)], GUID)
    before = digest(path)
    model[8192:12288] = page
    model[5 * MiB + 64 * KiB:5 * MiB + 192 * KiB] = bytes(128 * KiB)
    model[6 * MiB:7 * MiB] = model[5 * MiB:6 * MiB]
    model[5 * MiB:6 * MiB] = bytes(MiB)
    ours = read_all(path, "vhdx")
    assert ours == bytes(model)
    assert digest(path) == before
    assert qemu_replayed(path, tmp_path) == ours


def test_sequence_wrapping_round_the_log(image):
    """The tail entry starts in the log's last sector and wraps; a newer
    but torn entry is ignored."""
    path, model = image
    b0 = block_offset(path, 0)
    first = log_entry(8, LOG - 4096, GUID,
                      writes=[(b0, b"\x01" * 4096)])
    second = log_entry(9, LOG - 4096, GUID, zeros=[(b0 + MiB - 8192,
                                                    8192)])
    torn = log_entry(10, LOG - 4096, GUID,
                     writes=[(b0, b"\x02" * 4096)], damage="crc")
    assert len(first) == 8192
    put_log(path, [(LOG - 4096, first), (4096, second),
                   (4096 + len(second), torn)], GUID)
    model[:4096] = b"\x01" * 4096
    model[MiB - 8192:MiB] = bytes(8192)
    assert read_all(path, "vhdx") == bytes(model)


def test_log_guid_without_entries_replays_nothing(image):
    path, model = image
    put_log(path, [], GUID)
    assert read_all(path, "vhdx") == bytes(model)
