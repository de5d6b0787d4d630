"""nbdplug convert next to qemu-img convert, in one run.

A 1 GiB image, half allocated (1 MiB of data, 1 MiB of hole,
alternating), converted raw->raw, qcow2->vmdk and vmdk->qcow2.  The tools
take turns, ROUNDS times each, on a page-cached source; the figure is
the median wall time and the ratio qemu-img time / nbdplug time (above
1.0, nbdplug is faster).  Both make the output durable before they
exit: nbdplug always does; qemu-img convert does only when told
(`-t writeback`; its default leaves the data in the page cache).
"""

import os
import subprocess
import sys
import time

from common import REPO, ROUNDS, make_image, summary

PAIRS = [("raw", "raw"), ("qcow2", "vmdk"), ("vmdk", "qcow2")]


def _timed(argv):
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return time.monotonic() - start


def run(workdir):
    raw = os.path.join(workdir, "src.raw")
    make_image(raw, "raw", half=True)
    results = {}
    for src_fmt, out_fmt in PAIRS:
        src = os.path.join(workdir, f"src.{src_fmt}")
        if not os.path.exists(src):
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O",
                            src_fmt, raw, src], check=True)
        times = {"nbdplug": [], "qemu-img": []}
        dst = os.path.join(workdir, f"out.{out_fmt}")
        for _ in range(ROUNDS):
            for tool in times:
                argv = ([sys.executable, "-m", "nbdplug.cli", "convert",
                         "-q"] if tool == "nbdplug"
                        else ["qemu-img", "convert", "-t", "writeback"])
                times[tool].append(_timed(argv + ["-f", src_fmt, "-O",
                                                  out_fmt, src, dst]))
                os.unlink(dst)
        row = {tool: summary(t, "s") for tool, t in times.items()}
        row["ratio"] = row["qemu-img"]["median"] / row["nbdplug"]["median"]
        results[f"{src_fmt} -> {out_fmt}"] = row
        print(f"convert {src_fmt:>6} -> {out_fmt:<6} nbdplug "
              f"{row['nbdplug']['median']:6.2f} s  qemu-img "
              f"{row['qemu-img']['median']:6.2f} s  {row['ratio']:.2f}x",
              flush=True)
    return results


def markdown(results):
    lines = ["\n**convert**, 1 GiB half allocated (median [min-max] "
             "seconds; ratio qemu-img time / nbdplug time)\n",
             "| pair | nbdplug | qemu-img | ratio |", "|---|---|---|---|"]
    for pair, r in results.items():
        cells = [f"{r[t]['median']:.2f} s [{r[t]['min']:.2f}-"
                 f"{r[t]['max']:.2f}]" for t in ("nbdplug", "qemu-img")]
        lines.append(f"| {pair} | " + " | ".join(cells) +
                     f" | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"
