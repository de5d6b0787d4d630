"""Comparing what two images hold for the guest, as qemu-img compare does.

The result is qemu-img's: identical, or the first difference at the
start of its 512-byte sector.  Images of different sizes compare equal
when the larger one's tail reads as zeros; in strict mode a size or an
allocation difference is itself a mismatch.  Windows that both images
map as zeros are not read.  Strict mode compares allocation in the
chain; qemu-img's also compares its internal status flags, so where its
answer differs it names an earlier offset with no allocation change.
"""

import typing

from nbdplug.disk import MiB
from nbdplug.opener import open_image

SECTOR = 512
WINDOW = 4 * MiB
_ZEROS = bytes(WINDOW)


class Outcome(typing.NamedTuple):
    identical: bool
    messages: list      # qemu-img's lines, in its words


def compare(path1, path2, fmt1=None, fmt2=None, strict=False, share=False,
            policy=None):
    with open_image(path1, fmt1, readonly=True, policy=policy,
                    share=share) as a, \
            open_image(path2, fmt2, readonly=True, policy=policy,
                       share=share) as b:
        messages = []
        if a.size != b.size and strict:
            return Outcome(False, ["Strict mode: Image size mismatch!"])
        common = min(a.size, b.size)
        for off in range(0, common, WINDOW):
            n = min(WINDOW, common - off)
            runs_a, runs_b = a.map(n, off), b.map(n, off)
            if strict:
                at = _status_difference(runs_a, runs_b)
                if at is not None:
                    return Outcome(False, messages + [
                        f"Strict mode: Offset {at} block status mismatch!"])
            if _all_zero(runs_a) and _all_zero(runs_b):
                continue
            at = _first_difference(a.read(n, off), b.read(n, off))
            if at is not None:
                return _mismatch(messages, off + at)
        if a.size != b.size:
            messages.append("Warning: Image size mismatch!")
        longer = a if a.size > b.size else b
        for off in range(common, longer.size, WINDOW):
            n = min(WINDOW, longer.size - off)
            if _all_zero(longer.map(n, off)):
                continue
            at = _first_difference(longer.read(n, off), _ZEROS[:n])
            if at is not None:
                return _mismatch(messages, off + at)
        return Outcome(True, messages + ["Images are identical."])


def _mismatch(messages, offset):
    return Outcome(False, messages + [
        f"Content mismatch at offset {offset // SECTOR * SECTOR}!"])


def _all_zero(runs):
    return all(r.zero for r in runs)


def _first_difference(x, y):
    """Offset of the first byte where the views differ, or None."""
    if x == y:
        return None
    step = 64 * 1024
    for i in range(0, len(x), step):
        if x[i:i + step] != y[i:i + step]:
            for j in range(i, i + step):
                if x[j] != y[j]:
                    return j


def _status_difference(runs_a, runs_b):
    """The first offset allocated (in the chain) in one image and not in
    the other, or None."""
    ia = ib = 0
    while ia < len(runs_a) and ib < len(runs_b):
        ra, rb = runs_a[ia], runs_b[ib]
        start = max(ra.offset, rb.offset)
        if ra.present != rb.present:
            return start
        end_a, end_b = ra.offset + ra.length, rb.offset + rb.length
        ia += end_a <= end_b
        ib += end_b <= end_a
    return None
