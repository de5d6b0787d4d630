"""Side-by-side benchmark: nbdplug next to the tools it replaces.

Serves the same 1 GiB image with each server in the same run and drives
it with fio's nbd engine (libnbd underneath).  Each figure is the median
of several rounds, with min-max, and a ratio to the peer measured in the
same run.  Results go to bench/results/ (git ignores it) as JSON and a
markdown table.

    make bench              # default rounds
    BENCH_LONG=1 make bench # more rounds, longer runs
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nbdplug import server  # noqa: E402

GiB = 1 << 30
LONG = os.environ.get("BENCH_LONG") == "1"
ROUNDS = 5 if LONG else 3
RUNTIME = 10 if LONG else 3

# (name, fio rw, block size, queue depth, connections)
WORKLOADS = [
    ("seq read 1M", "read", "1M", 4, 1),
    ("seq write 1M", "write", "1M", 4, 1),
    ("rand read 4K QD1", "randread", "4k", 1, 1),
    ("rand read 4K QD16", "randread", "4k", 16, 1),
    ("rand write 4K QD1", "randwrite", "4k", 1, 1),
    ("rand write 4K QD16", "randwrite", "4k", 16, 1),
    ("rand read 4K QD16 x2 conn", "randread", "4k", 16, 2),
]


@contextlib.contextmanager
def nbdplug_server(image, fmt, sock):
    argv = ["nbdkit", "-U", sock, "-P", sock + ".pid"] + \
        server.plugin_args(image, fmt)
    with _daemon(argv, sock + ".pid"):
        yield server.unix_uri(sock)


@contextlib.contextmanager
def nbdkit_file_server(image, fmt, sock):
    argv = ["nbdkit", "-U", sock, "-P", sock + ".pid", "file", image]
    with _daemon(argv, sock + ".pid"):
        yield server.unix_uri(sock)


@contextlib.contextmanager
def qemu_nbd_server(image, fmt, sock):
    proc = subprocess.Popen(["qemu-nbd", "-f", fmt, "--cache=writeback",
                             "-k", sock, "--shared=4", "-t", image])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.01)
        yield server.unix_uri(sock)
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def _daemon(argv, pidfile):
    server.start_background(argv, pidfile)
    try:
        yield
    finally:
        server.stop(pidfile)


SERVERS = {
    "nbdplug": nbdplug_server,
    "nbdkit-file": nbdkit_file_server,
    "qemu-nbd": qemu_nbd_server,
}


def fio(uri, rw, bs, qd, conns, out):
    subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}",
         f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
         f"--numjobs={conns}", "--group_reporting", "--time_based",
         f"--runtime={RUNTIME}", "--ramp_time=1", "--size=1G",
         "--randrepeat=0", "--output-format=json", f"--output={out}"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    if bs == "1M":
        return side["bw_bytes"] / (1 << 20), "MiB/s"
    return side["iops"], "IOPS"


def make_image(path, fmt):
    """A fully allocated 1 GiB image of `fmt` (random data)."""
    raw = path + ".src.raw"
    subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M",
                    "count=1024", "status=none"], check=True)
    if fmt == "raw":
        os.rename(raw, path)
    else:
        opts = ["-o", "subformat=dynamic"] if fmt == "vpc" else []
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt,
                        *opts, raw, path], check=True)
        os.unlink(raw)


def bench_format(workdir, fmt, servers, peer):
    image = os.path.join(workdir, f"bench.{fmt}")
    make_image(image, fmt)
    results = {}
    for name, rw, bs, qd, conns in WORKLOADS:
        row = {}
        for sname in servers:
            values = []
            for _ in range(ROUNDS):
                sock = os.path.join(workdir, f"{sname}.sock")
                with SERVERS[sname](image, fmt, sock) as uri:
                    value, unit = fio(uri, rw, bs, qd, conns,
                                      os.path.join(workdir, "fio.json"))
                values.append(value)
            row[sname] = {"median": statistics.median(values),
                          "min": min(values), "max": max(values),
                          "unit": unit}
        base = row[peer]["median"]
        for sname in servers:
            row[sname]["ratio"] = row[sname]["median"] / base if base else 0
        results[name] = row
        print(f"{fmt:6} {name:28} " + "  ".join(
            f"{s}={row[s]['median']:.0f} ({row[s]['ratio']:.2f}x)"
            for s in servers), flush=True)
    os.unlink(image)
    return results


def markdown(all_results, peers):
    lines = []
    for fmt, results in all_results.items():
        servers = list(next(iter(results.values())))
        lines.append(f"\n**{fmt}** (ratio to {peers[fmt]} in the same run)\n")
        lines.append("| workload | " + " | ".join(servers) + " |")
        lines.append("|---" * (len(servers) + 1) + "|")
        for name, row in results.items():
            cells = []
            for s in servers:
                r = row[s]
                cells.append(f"{r['median']:.0f} {r['unit']} "
                             f"[{r['min']:.0f}-{r['max']:.0f}] "
                             f"{r['ratio']:.2f}x")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="raw",
                        help="comma-separated: raw")
    parser.add_argument("--out", default=os.path.join(REPO, "bench",
                                                      "results"))
    args = parser.parse_args()
    plan = {
        "raw": (["nbdplug", "nbdkit-file", "qemu-nbd"], "nbdkit-file"),
        "qcow2": (["nbdplug", "qemu-nbd"], "qemu-nbd"),
        # make_image's qemu-img convert writes VMDK as monolithicSparse.
        "vmdk": (["nbdplug", "qemu-nbd"], "qemu-nbd"),
        "vpc": (["nbdplug", "qemu-nbd"], "qemu-nbd"),
    }
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="nbdplug-bench.", dir="/var/tmp")
    all_results, peers = {}, {}
    try:
        for fmt in args.formats.split(","):
            servers, peer = plan[fmt]
            peers[fmt] = peer
            all_results[fmt] = bench_format(workdir, fmt, servers, peer)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"rounds": ROUNDS, "runtime_s": RUNTIME, "cpus": os.cpu_count(),
            "date": stamp}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "results": all_results}, f, indent=2)
    table = markdown(all_results, peers)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
