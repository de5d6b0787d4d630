"""nbdplug convert against qemu-img convert, in one run.

A 1 GiB image, half allocated (1 MiB of data, 1 MiB hole, alternating),
converted raw->raw and, where this build has the drivers, qcow2->vmdk and
vmdk->qcow2.  Each pair runs ROUNDS times, alternating the tools, on a
page-cached source; the median wall time is reported, and the ratio
qemu-img time / nbdplug time (above 1.0: nbdplug is faster).

    .venv/bin/python bench/convert_bench.py [ROUNDS]
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nbdplug import FORMATS  # noqa: E402

MiB = 1 << 20
SIZE = 1024 * MiB
PAIRS = [("raw", "raw"), ("qcow2", "vmdk"), ("vmdk", "qcow2")]


def timed(argv):
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return time.monotonic() - start


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    work = tempfile.mkdtemp(prefix="convert-bench.", dir="/var/tmp")
    raw = os.path.join(work, "src.raw")
    chunk = os.urandom(MiB)
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 2 * MiB):
            f.seek(off)
            f.write(chunk)
    results = []
    for src_fmt, out_fmt in PAIRS:
        if src_fmt not in FORMATS or out_fmt not in FORMATS:
            continue
        src = raw if src_fmt == "raw" else os.path.join(work, f"src.{src_fmt}")
        if not os.path.exists(src):
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O",
                            src_fmt, raw, src], check=True)
        times = {"nbdplug": [], "qemu-img": []}
        for _ in range(rounds):
            for tool in times:
                dst = os.path.join(work, f"out.{out_fmt}")
                argv = ([sys.executable, "-m", "nbdplug.cli", "convert"]
                        if tool == "nbdplug" else ["qemu-img", "convert"])
                times[tool].append(timed(argv + ["-f", src_fmt, "-O",
                                                 out_fmt, src, dst]))
                os.unlink(dst)
        ours = statistics.median(times["nbdplug"])
        theirs = statistics.median(times["qemu-img"])
        results.append({"pair": f"{src_fmt}->{out_fmt}", "nbdplug_s": ours,
                        "qemu_img_s": theirs, "ratio": theirs / ours})
        print(f"{src_fmt:>6} -> {out_fmt:<6} nbdplug {ours:6.2f} s   "
              f"qemu-img {theirs:6.2f} s   ratio {theirs / ours:4.2f}x",
              flush=True)
    subprocess.run(["rm", "-rf", work])
    out = os.path.join(REPO, "bench", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "convert.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
