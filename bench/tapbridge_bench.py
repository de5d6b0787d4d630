"""tapbridge next to NBD: the same driver through the blkif ring and
through nbdkit with the plugin, in the same run.

The ring is the shared-memory transport driven by the C test frontend
(Xen's ring.h macros; tests/tapbridge/frontend.c) keeping a fixed number
of requests in flight, as a guest's blkfront would; NBD is fio's nbd
engine at the same depth against nbdkit serving the same image with our
plugin.  4 KiB random reads and writes (IOPS) and 1 MiB random reads and
writes (MiB/s), ring orders 0 and 4 at 32 and 256 requests in flight.
Each figure is the median of ROUNDS runs after a 1 s ramp.
"""

import argparse
import os
import shutil
import sys
import tempfile

from common import (GiB, MiB, REPO, ROUNDS, RUNTIME, fio, make_image,
                    nbdplug_server, summary)

sys.path.insert(0, os.path.join(REPO, "tests", "tapbridge"))
from tbharness import Backend, Frontend, ShmDir  # noqa: E402
# (name, fio/frontend mode, block size)
WORKLOADS = [
    ("rand read 4K", "randread", "4k"),
    ("rand write 4K", "randwrite", "4k"),
    ("rand read 1M", "randread", "1M"),
    ("rand write 1M", "randwrite", "1M"),
]
# (ring-page-order, requests in flight); order 0 holds only 32
RINGS = [(0, 32), (4, 32), (4, 256)]
_BYTES = {"4k": 4096, "1M": MiB}


def ring(image, fmt, workdir, mode, bs, order, qd, extra=()):
    """IOPS (4k) or MiB/s (1M) through serve-shm at `qd` in flight;
    `extra`: more serve-shm arguments (--workers N)."""
    nbytes = _BYTES[bs]
    # Guest memory: each slot's data pages, then its indirect page.
    shm = ShmDir(os.path.join(workdir, "shm"), qd * (nbytes // 4096 + 1))
    fe = Frontend(shm, order)
    be = Backend(shm, image, fmt=fmt, order=order, extra=extra)
    try:
        fe.bench(mode, nbytes, qd, 1, GiB)          # ramp
        ops, errors, seconds = fe.bench(mode, nbytes, qd, RUNTIME, GiB)
    finally:
        be.stop()
        fe.close()
        shm.close()
        shutil.rmtree(shm.path)
    if errors:
        raise RuntimeError(f"{errors} requests failed through the ring")
    return ops * nbytes / MiB / seconds if nbytes >= MiB else ops / seconds


def nbd(image, fmt, workdir, mode, bs, qd):
    sock = os.path.join(workdir, "nbd.sock")
    with nbdplug_server(image, fmt, sock) as srv:
        return fio(srv.uri, mode, bs, qd, 1,
                   os.path.join(workdir, "fio.json"))[0]


def run(workdir, fmt="raw", workloads=WORKLOADS, rings=RINGS,
        rounds=ROUNDS, extra=()):
    image = os.path.join(workdir, f"bench.{fmt}")
    make_image(image, fmt)
    # Guest memory lives in RAM, as it would.
    shmdir = tempfile.mkdtemp(prefix="tapbridge-bench.", dir="/dev/shm")
    try:
        return _run(image, fmt, workdir, shmdir, workloads, rings, rounds,
                    extra)
    finally:
        shutil.rmtree(shmdir, ignore_errors=True)
        os.unlink(image)


def _run(image, fmt, workdir, shmdir, workloads, rings, rounds, extra):
    results = {}
    for name, mode, bs in workloads:
        unit = "MiB/s" if bs == "1M" else "IOPS"
        peers = {qd: summary([nbd(image, fmt, workdir, mode, bs, qd)
                              for _ in range(rounds)])
                 for qd in sorted({qd for _, qd in rings})}
        for order, qd in rings:
            r = summary([ring(image, fmt, shmdir, mode, bs, order, qd,
                              extra) for _ in range(rounds)])
            r["nbd"] = peers[qd]
            r["ratio"] = r["median"] / peers[qd]["median"]
            r["unit"] = unit
            key = f"{name} order {order} QD{qd}"
            results[key] = r
            print(f"tapbridge {fmt:6} {key:32} ring {r['median']:9.0f} "
                  f"{unit:5}  nbd {peers[qd]['median']:9.0f}  "
                  f"{r['ratio']:.2f}x", flush=True)
    return results


def markdown(results, fmt="raw"):
    lines = [f"\n**tapbridge shm ring vs nbdkit + plugin over NBD, {fmt}** "
             "(same driver, same run; ratio ring/NBD at the same depth)\n",
             "| workload | ring | NBD (fio) | ratio |", "|---|---|---|---|"]
    for key, r in results.items():
        lines.append(
            f"| {key} | {r['median']:.0f} {r['unit']} "
            f"[{r['min']:.0f}-{r['max']:.0f}] | {r['nbd']['median']:.0f} "
            f"[{r['nbd']['min']:.0f}-{r['nbd']['max']:.0f}] | "
            f"{r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(
        name for name, _, _ in WORKLOADS),
        help="comma-separated, from: " + ", ".join(
            name for name, _, _ in WORKLOADS))
    parser.add_argument("--rings", default=",".join(
        f"{order}:{qd}" for order, qd in RINGS),
        help="comma-separated ORDER:QD pairs")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--workers", type=int,
                        help="serve-shm --workers (default: its own)")
    args = parser.parse_args()
    names = args.workloads.split(",")
    workloads = [w for w in WORKLOADS if w[0] in names]
    rings = [tuple(map(int, r.split(":"))) for r in args.rings.split(",")]
    extra = ("--workers", str(args.workers)) if args.workers else ()
    workdir = tempfile.mkdtemp(prefix="tapbridge-bench.", dir="/var/tmp")
    try:
        results = run(workdir, workloads=workloads, rings=rings,
                      rounds=args.rounds, extra=extra)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
