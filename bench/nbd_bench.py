"""Serving over NBD: nbdplug next to qemu-nbd (and, for raw, nbdkit's C
file plugin), the same 1 GiB image, the same fio workloads, one run.

The last rows have several clients: fio's jobs on connections of their
own, and fio while 100 more clients sit connected without having begun
their handshake (a server that lets one client stall the others scores
0 there).  Beside each figure, the server's CPU time a request (user and
system, every thread; the ramp's requests counted too), which depends
on the load of the machine far less than the rate does."""

import os

from common import (RAMP_SECONDS, ROUNDS, RUNTIME, SERVERS, cpu_seconds,
                    fio, idle_clients, make_image, summary)

# (name, fio rw, block size, queue depth, connections, idle clients)
WORKLOADS = [
    ("seq read 1M", "read", "1M", 4, 1, 0),
    ("seq write 1M", "write", "1M", 4, 1, 0),
    ("rand read 4K QD1", "randread", "4k", 1, 1, 0),
    ("rand read 4K QD16", "randread", "4k", 16, 1, 0),
    ("rand write 4K QD1", "randwrite", "4k", 1, 1, 0),
    ("rand write 4K QD16", "randwrite", "4k", 16, 1, 0),
    ("rand read 4K QD16 x2 conn", "randread", "4k", 16, 2, 0),
    ("rand write 4K QD16 x2 conn", "randwrite", "4k", 16, 2, 0),
    ("rand read 4K QD16 x4 conn", "randread", "4k", 16, 4, 0),
    ("rand read 4K QD16, 100 idle", "randread", "4k", 16, 1, 100),
]

# format -> (servers, the peer ratios are taken against)
PLAN = {
    "raw": (["nbdplug", "nbdkit-file", "qemu-nbd"], "nbdkit-file"),
    "qcow2": (["nbdplug", "qemu-nbd"], "qemu-nbd"),
    "vmdk": (["nbdplug", "qemu-nbd"], "qemu-nbd"),
    "vpc": (["nbdplug", "qemu-nbd"], "qemu-nbd"),
}


def run(fmt, workdir, also=()):
    """{workload: {server: summary + ratio}} for one format.  Each server
    is started once and runs every workload ROUNDS times, servers taking
    turns round by round so drift hits them alike.  `also`: more servers
    (from common.SERVERS) to measure beside the plan's."""
    servers, peer = PLAN[fmt]
    servers = servers + [s for s in also if s not in servers]
    image = os.path.join(workdir, f"bench.{fmt}")
    make_image(image, fmt)
    values = {(w[0], s): [] for w in WORKLOADS for s in servers}
    cpus = {(w[0], s): [] for w in WORKLOADS for s in servers}
    units = {}
    try:
        for _ in range(ROUNDS):
            for s in servers:
                sock = os.path.join(workdir, f"{s}.sock")
                with SERVERS[s](image, fmt, sock) as srv:
                    for name, rw, bs, qd, conns, idle in WORKLOADS:
                        with idle_clients(sock, idle):
                            cpu = cpu_seconds(srv.pid)
                            value, units[name] = fio(
                                srv.uri, rw, bs, qd, conns,
                                os.path.join(workdir, "fio.json"))
                            cpu = cpu_seconds(srv.pid) - cpu
                        values[name, s].append(value)
                        if value:
                            cpus[name, s].append(
                                cpu / _requests(value) * 1e6)
    finally:
        os.unlink(image)
    results = {}
    for name, *_ in WORKLOADS:
        row = {s: summary(values[name, s], units[name]) for s in servers}
        for s in servers:
            row[s]["cpu_us"] = summary(cpus[name, s])["median"] \
                if cpus[name, s] else None
        base = row[peer]["median"]
        for s in servers:
            row[s]["ratio"] = row[s]["median"] / base if base else 0.0
        results[name] = row
        print(f"{fmt:6} {name:29} " + "  ".join(
            f"{s}={row[s]['median']:.0f} ({row[s]['ratio']:.2f}x)"
            for s in servers), flush=True)
    return results


def _requests(rate):
    """How many requests fio made at `rate` (IOPS, or MiB/s of 1 MiB
    requests: requests a second either way)."""
    return rate * (RUNTIME + RAMP_SECONDS)


def markdown(fmt, results):
    peer = PLAN[fmt][1]
    servers = list(next(iter(results.values())))
    lines = [f"\n**{fmt} over NBD** (median [min-max] of the rounds; ratio "
             f"to {peer} in the same run; server CPU time a request)\n",
             "| workload | " + " | ".join(servers) + " |",
             "|---" * (len(servers) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[s]['median']:.0f} {row[s]['unit']} "
                 f"[{row[s]['min']:.0f}-{row[s]['max']:.0f}] "
                 f"{row[s]['ratio']:.2f}x" + (
                     f", {row[s]['cpu_us']:.0f} µs" if row[s]["cpu_us"]
                     else "") for s in servers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
