"""Running one image through qemu-img and nbdplug, and judging the pair.

qemu-img is the oracle: `info`, `check` and `convert -O raw` say whether
qemu reads the image, whether its check finds it clean, and what bytes
it reads.  nbdplug runs the same verbs (in a worker, under a memory
limit and a deadline), then writes to a copy, which qemu-img checks and
reads back.  What comes out is a verdict: every class that applies, with
what was seen.

Bad classes (a fuzz round must show none):
  traceback       nbdplug raised something other than a one-line error
  hang            a verb outlived its deadline
  memory          a verb ran out of its address space
  input modified  reading (info, check, convert) changed the image
  accepts corrupt qemu cannot read the image, we read it
  refuses clean   qemu reads it and checks it clean, we refuse it
  bytes differ    both read it, not the same bytes
  check disagrees qemu-img check and ours end with different exit codes
                  (qcow2); qemu-img finds corruption ours does not (VMDK:
                  qemu checks only for grains past the end, ours more)
  write damage    our writes to an image qemu checks clean left one qemu
                  finds corrupt, or that reads back other than written
A refusal matching one of the deliberate refusals the README lists is
"deliberate", and an image we read whose qemu-img refusal matches one of
the deliberate leniencies it lists is "lenient": neither is bad.
"""

import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import typing

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEADLINE = 30                   # seconds a verb may take
MEMORY = 512 << 20              # the worker's address space
BAD = ("traceback", "hang", "memory", "input modified", "accepts corrupt",
       "refuses clean", "bytes differ", "check disagrees", "write damage")
# Formats whose check both sides run (qemu-img checks vhdx, we do not;
# qemu-img does not check vpc or qcow).
CHECKED = ("qcow2", "vmdk")


def check_disagrees(fmt, ours, theirs):
    """Whether the two checks' exit codes disagree (see BAD)."""
    if fmt == "qcow2":
        return ours != theirs
    return theirs == 2 and ours != 2


def deliberate(heading):
    """The messages README.rst lists under `heading`: the quoted text of
    each item ("Deliberate refusals": ours; "Deliberate leniencies":
    qemu-img's refusals of images we read)."""
    with open(os.path.join(REPO, "README.rst")) as f:
        lines = f.read().splitlines()
    start = lines.index(heading) + 2            # past its underline
    end = next((i for i in range(start, len(lines) - 1)
                if lines[i].strip() and lines[i + 1][:3] in ("---", "===")),
               len(lines))
    part = "\n".join(lines[start:end])
    return [m.replace("\n", " ") for m in re.findall(r'``"([^`]+)"``', part)]


def deliberate_refusals():
    return deliberate("Deliberate refusals")


def deliberate_leniencies():
    return deliberate("Deliberate leniencies")


class Worker:
    """A worker process (worker.py), replaced when it hangs or dies."""

    def __init__(self):
        self.proc = None

    def _start(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "worker.py"), str(MEMORY)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, cwd=REPO)

    def call(self, request):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            hung = not ready
            self.close()
            return {"rc": None, "error": "hang" if hung else "died",
                    "stdout": "", "stderr": ""}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def qemu(argv):
    """(exit code, stdout, stderr) of a qemu-img command; None as the
    code when it outlives the deadline."""
    try:
        proc = subprocess.run(["qemu-img"] + argv, capture_output=True,
                              text=True, timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        return None, "", "timed out"
    return proc.returncode, proc.stdout, proc.stderr


def digest(path):
    """The image's digest (images are small; their raw outputs need not
    be: same_bytes compares those)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data(f, size):
    """(start, end) of each stretch of the open file `f` that is not a
    hole (holes read as zeros)."""
    fd, pos = f.fileno(), 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:             # ENXIO: a hole from pos to the end
            return
        pos = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, pos


def same_bytes(a, b, skip=None):
    """Whether files `a` and `b` hold the same bytes (outside [0, skip)),
    compared only where either holds data: the raw image of a huge,
    mostly empty disk is a sparse file."""
    size = os.path.getsize(a)
    if os.path.getsize(b) != size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        spans = sorted(list(_data(fa, size)) + list(_data(fb, size)))
        pos = skip or 0                 # compared up to here
        for start, end in spans:
            for at in range(max(start, pos), end, 1 << 20):
                n = min(1 << 20, end - at)
                if os.pread(fa.fileno(), n, at) != \
                        os.pread(fb.fileno(), n, at):
                    return False
            pos = max(pos, end)
    return True


def first_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


# Writes to a copy: the first cluster, one in the middle, past the data
# the seeds hold, a zeroed and a trimmed range.
WRITES = [["pwrite", 0, 4096, 0x5A], ["pwrite", 200 * 1024, 70 * 1024, 0x5B],
          ["pwrite", 1536 * 1024 + 512, 1024, 0x5C],
          ["zero", 64 * 1024, 8192], ["trim", 1024 * 1024, 64 * 1024]]


class Verdict(typing.NamedTuple):
    classes: dict           # class -> what was seen
    facts: dict             # what each side said

    @property
    def bad(self):
        return {k: v for k, v in self.classes.items() if k in BAD}


def judge(image, fmt, work, worker, write=True, allowed=None):
    """Run both sides on `image` (format `fmt`), scratch files in `work`;
    return a Verdict.  `allowed`: (deliberate refusals, leniencies)."""
    refusals, leniencies = allowed or (deliberate_refusals(),
                                       deliberate_leniencies())
    classes, facts = {}, {}
    before = digest(image)
    q_raw, o_raw = os.path.join(work, "qemu.raw"), os.path.join(work,
                                                                "ours.raw")
    for path in (q_raw, o_raw):
        if os.path.exists(path):
            os.unlink(path)

    q_info = qemu(["info", "-f", fmt, "--output=json", image])
    q_check = qemu(["check", "-f", fmt, "--output=json", image]) \
        if fmt in CHECKED else (63, "", "")
    q_conv = qemu(["convert", "-f", fmt, "-O", "raw", image, q_raw])
    q_reads = q_info[0] == 0 and q_conv[0] == 0
    q_clean = q_reads and q_check[0] in (0, 3, 63)
    facts["qemu"] = {"reads": q_reads, "check": q_check[0],
                     "error": first_line(q_conv[2] or q_info[2])}

    o_info = worker.call({"argv": ["info", "-f", fmt, image]})
    o_check = worker.call({"argv": ["check", "-f", fmt, image]})
    o_conv = worker.call({"argv": ["convert", "-f", fmt, "-O", "raw", image,
                                   o_raw]})
    o_reads = o_info["rc"] == 0 and o_conv["rc"] == 0
    refusal = first_line(o_conv["stderr"] or o_info["stderr"])
    facts["nbdplug"] = {"reads": o_reads, "check": o_check["rc"],
                        "error": refusal}

    for name, answer in (("info", o_info), ("check", o_check),
                         ("convert", o_conv)):
        _errors(classes, name, answer)
    if digest(image) != before:
        classes["input modified"] = "after info/check/convert"

    if q_reads and o_reads and not same_bytes(q_raw, o_raw):
        classes["bytes differ"] = "qemu-img convert and ours differ"
    if q_clean and not o_reads and "traceback" not in classes:
        if any(text in refusal for text in refusals):
            classes["deliberate"] = refusal
        else:
            classes["refuses clean"] = refusal
    if not q_reads and o_reads and q_info[0] is not None:
        error = facts["qemu"]["error"]
        if any(text in error for text in leniencies):
            classes["lenient"] = error
        else:
            classes["accepts corrupt"] = error
    if fmt in CHECKED and q_check[0] is not None and \
            o_check["rc"] is not None and \
            check_disagrees(fmt, o_check["rc"], q_check[0]):
        classes["check disagrees"] = \
            f"qemu-img check {q_check[0]}, ours {o_check['rc']}"

    # Writes go to images both sides call sound (qemu cannot check vpc
    # or qcow: there ours decides).
    if write and q_clean and o_reads and not classes and \
            o_check["rc"] in (0, 3, 63):
        _write_test(image, fmt, work, worker, q_raw, classes, facts)
    for path in (q_raw, o_raw):
        if os.path.exists(path):
            os.unlink(path)
    return Verdict(classes, facts)


def _errors(classes, name, answer):
    error = answer.get("error")
    if error == "hang":
        classes["hang"] = name
    elif error == "died" or error == "MemoryError":
        classes["memory"] = f"{name}: {error}"
    elif error:
        classes["traceback"] = f"{name}: {error.strip().splitlines()[-1]}"
    elif "Traceback" in answer.get("stderr", ""):
        classes["traceback"] = f"{name}: printed a traceback"


def _write_test(image, fmt, work, worker, q_raw, classes, facts):
    """Write through our driver to a copy of an image qemu reads clean;
    qemu must then check it as clean as before and read what we wrote."""
    copy = os.path.join(work, "written." + fmt)
    shutil.copyfile(image, copy)
    answer = worker.call({"write": copy, "format": fmt, "ops": WRITES})
    _errors(classes, "write", answer)
    facts["write"] = answer["rc"]
    if answer["rc"] != 0 or classes:
        os.unlink(copy)
        return
    check = qemu(["check", "-f", fmt, copy])[0] if fmt in CHECKED else 0
    back = os.path.join(work, "written.raw")
    conv = qemu(["convert", "-f", fmt, "-O", "raw", copy, back])
    if check not in (0, 3):
        classes["write damage"] = f"qemu-img check {check} after our writes"
    elif conv[0] != 0:
        classes["write damage"] = "qemu-img cannot read it after our " \
            "writes: " + first_line(conv[2])
    elif not _reads_as_written(q_raw, back):
        classes["write damage"] = "reads back other than written"
    for path in (copy, back):
        if os.path.exists(path):
            os.unlink(path)


def _reads_as_written(before, after):
    """`after` is `before` with WRITES applied: written and zeroed bytes
    as asked (no seed has a backing file), each trimmed sector either as
    it was or zeros (discard may leave data)."""
    size = os.path.getsize(before)
    if os.path.getsize(after) != size:
        return False
    # The writes' window is judged in memory, the rest compared.
    window = min(size, max(offset + length for _, offset, length, *_ in
                           WRITES))
    with open(before, "rb") as f:
        old = f.read(window)
    with open(after, "rb") as f:
        new = f.read(window)
    expect = bytearray(old)
    trimmed = []
    for op, offset, length, *rest in WRITES:
        offset = min(offset, len(expect))
        length = min(length, len(expect) - offset)
        if op == "trim":
            trimmed.append((offset, length))
            continue
        byte = rest[0] if op == "pwrite" else 0
        expect[offset:offset + length] = bytes([byte]) * length
        trimmed = [(o, n) for o, n in trimmed
                   if o + n <= offset or offset + length <= o]
    for offset, length in trimmed:
        for at in range(offset, offset + length, 512):
            sector = new[at:at + 512]
            if sector == bytes(len(sector)):
                expect[at:at + 512] = sector
    return new == bytes(expect) and same_bytes(before, after, skip=window)
