"""make bench: nbdplug side by side with the tools it replaces.

Every figure is measured in the same run as its peer, on this machine:

- serving over NBD (fio's nbd engine on libnbd): 1 GiB raw, fully
  allocated qcow2, monolithicSparse VMDK and dynamic VHD images, served by
  nbdplug, qemu-nbd (writeback cache) and, for raw, nbdkit's C file
  plugin; sequential 1 MiB and random 4 KiB reads and writes at QD1 and
  QD16, two and four connections at QD16, and QD16 with 100 clients
  idle in their handshake;
- `nbdplug convert` against `qemu-img convert`;
- tapbridge's shared-memory blkif ring against the same driver over NBD;
- `nbdplug migrate`: the fill against nbdcopy of the same export, and
  4 KiB read latency on local clusters during the fill against idle;
- the fast device (dm over loop and NBD) against a loop device on the
  raw twin and against the NBD-only attach, in one boot of the kernel
  lane (fast_bench.py), with the promotion delay and table sizes.

Medians of several rounds with [min-max], each with a ratio to its peer.
Results go to bench/results/ (git ignores it): bench.json, bench.md and
bench.png (the ratios as a bar chart).

    make bench                  # about five minutes
    BENCH_LONG=1 make bench     # more rounds, longer runs
    .venv/bin/python bench/bench.py --only nbd --formats raw,qcow2
    .venv/bin/python bench/bench.py --only nbd --also nbdplug-all-requests
                                # and the plugin under the old thread model
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import convert_bench  # noqa: E402
import fast_bench  # noqa: E402
import migrate_bench  # noqa: E402
import nbd_bench  # noqa: E402
import tapbridge_bench  # noqa: E402

PARTS = ("nbd", "convert", "tapbridge", "migrate", "fast")


def ratios(results):
    """(label, ratio) pairs for the chart: nbdplug against its peer."""
    out = []
    for fmt, rows in results.get("nbd", {}).items():
        peer = nbd_bench.PLAN[fmt][1]
        for name, row in rows.items():
            out.append((f"{fmt}: {name} (vs {peer})",
                        row["nbdplug"]["ratio"]))
    for pair, row in results.get("convert", {}).items():
        out.append((f"convert {pair} (vs qemu-img)", row["ratio"]))
    for key, row in results.get("tapbridge", {}).items():
        out.append((f"tapbridge ring {key} (vs NBD)", row["ratio"]))
    if "migrate" in results:
        m = results["migrate"]
        out.append(("migrate fill (vs nbdcopy)", m["fill"]["ratio"]))
        # Latency: lower is better, so idle / during fill.
        out.append(("migrate 4K read latency during fill (vs idle)",
                    1 / m["latency"]["ratio"]))
    for key, row in results.get("fast", {}).get("rows", {}).items():
        out.append((f"fast device {key} (vs loop on raw)", row["vs loop"]))
        out.append((f"fast device {key} (vs NBD only)", row["vs nbd"]))
    return out


def chart(pairs, path):
    import matplotlib           # Debian's python3-matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [label for label, _ in pairs][::-1]
    values = [value for _, value in pairs][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(pairs) + 1.2))
    colors = ["#2a7" if v >= 1.0 else "#c53" for v in values]
    ax.barh(range(len(values)), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.set_xlabel("ratio to the peer measured in the same run "
                  "(above 1: nbdplug is faster)")
    ax.set_title("nbdplug / peer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma-separated parts: " + ", ".join(PARTS))
    parser.add_argument("--formats", default=",".join(nbd_bench.PLAN),
                        help="formats served over NBD")
    parser.add_argument("--also", default="",
                        help="comma-separated servers to serve every format "
                        "besides the plan's: " + ", ".join(common.SERVERS))
    parser.add_argument("--out", default=common.RESULTS)
    args = parser.parse_args()
    parts = args.only.split(",")
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="nbdplug-bench.", dir="/var/tmp")
    results = {}
    started = time.monotonic()
    try:
        if "nbd" in parts:
            also = [s for s in args.also.split(",") if s]
            results["nbd"] = {fmt: nbd_bench.run(fmt, workdir, also)
                              for fmt in args.formats.split(",")}
        if "convert" in parts:
            results["convert"] = convert_bench.run(workdir)
        if "tapbridge" in parts:
            results["tapbridge"] = tapbridge_bench.run(workdir)
        if "migrate" in parts:
            results["migrate"] = migrate_bench.run(workdir)
        if "fast" in parts:
            results["fast"] = fast_bench.run(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "rounds": common.ROUNDS, "runtime_s": common.RUNTIME,
            "minutes": round((time.monotonic() - started) / 60, 1),
            "load": os.getloadavg()[0]}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    table = (f"nbdplug bench, {meta['date']}, {meta['cpus']} CPUs, "
             f"{meta['rounds']} rounds of {meta['runtime_s']} s\n")
    for fmt, rows in results.get("nbd", {}).items():
        table += nbd_bench.markdown(fmt, rows)
    if "convert" in results:
        table += convert_bench.markdown(results["convert"])
    if "tapbridge" in results:
        table += tapbridge_bench.markdown(results["tapbridge"])
    if "migrate" in results:
        table += migrate_bench.markdown(results["migrate"])
    if "fast" in results:
        table += fast_bench.markdown(results["fast"])
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(table)
    chart(ratios(results), os.path.join(args.out, "bench.png"))
    print(table)
    print(f"results in {args.out}: bench.json, bench.md, bench.png")


if __name__ == "__main__":
    main()
