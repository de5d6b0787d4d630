"""Serving over NBD: nbdplug next to qemu-nbd (and, for raw, nbdkit's C
file plugin), the same 1 GiB image, the same fio workloads, one run."""

import os

from common import SERVERS, ROUNDS, fio, make_image, summary

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

# format -> (servers, the peer ratios are taken against)
PLAN = {
    "raw": (["nbdplug", "nbdkit-file", "qemu-nbd"], "nbdkit-file"),
    "qcow2": (["nbdplug", "qemu-nbd"], "qemu-nbd"),
    "vmdk": (["nbdplug", "qemu-nbd"], "qemu-nbd"),
    "vpc": (["nbdplug", "qemu-nbd"], "qemu-nbd"),
}


def run(fmt, workdir):
    """{workload: {server: summary + ratio}} for one format.  Each server
    is started once and runs every workload ROUNDS times, servers taking
    turns round by round so drift hits them alike."""
    servers, peer = PLAN[fmt]
    image = os.path.join(workdir, f"bench.{fmt}")
    make_image(image, fmt)
    values = {(w[0], s): [] for w in WORKLOADS for s in servers}
    units = {}
    try:
        for _ in range(ROUNDS):
            for s in servers:
                sock = os.path.join(workdir, f"{s}.sock")
                with SERVERS[s](image, fmt, sock) as uri:
                    for name, rw, bs, qd, conns in WORKLOADS:
                        value, units[name] = fio(
                            uri, rw, bs, qd, conns,
                            os.path.join(workdir, "fio.json"))
                        values[name, s].append(value)
    finally:
        os.unlink(image)
    results = {}
    for name, *_ in WORKLOADS:
        row = {s: summary(values[name, s], units[name]) for s in servers}
        base = row[peer]["median"]
        for s in servers:
            row[s]["ratio"] = row[s]["median"] / base if base else 0.0
        results[name] = row
        print(f"{fmt:6} {name:28} " + "  ".join(
            f"{s}={row[s]['median']:.0f} ({row[s]['ratio']:.2f}x)"
            for s in servers), flush=True)
    return results


def markdown(fmt, results):
    servers, peer = PLAN[fmt]
    lines = [f"\n**{fmt} over NBD** (median [min-max] of the rounds; ratio "
             f"to {peer} in the same run)\n",
             "| workload | " + " | ".join(servers) + " |",
             "|---" * (len(servers) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[s]['median']:.0f} {row[s]['unit']} "
                 f"[{row[s]['min']:.0f}-{row[s]['max']:.0f}] "
                 f"{row[s]['ratio']:.2f}x" for s in servers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
