"""Where a small request's time goes: nbdkit -> Python plugin -> driver.

Runs each server under valgrind's callgrind (instruction counts: the same
on a busy or a quiet machine), sends N random 4 KiB reads over one
connection, and subtracts a run with fewer requests (which pays start-up
and warms the caches the same way), so what remains is the cost of one
request in steady state, split by the object it runs in (nbdkit, libpython,
libc, the file plugin...).  A minimal Python plugin (os.preadv and
nothing else) separates the price of nbdkit's Python glue from ours.

    .venv/bin/python bench/profile.py [--requests N]

Writes bench/results/profile.md and profile.json.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nbdplug.serve import nbdkit as server  # noqa: E402

MiB = 1 << 20
SIZE = 256 * MiB

MINIMAL_PLUGIN = '''
import os
API_VERSION = 2
fd = -1
def config(key, value):
    global fd
    fd = os.open(value, os.O_RDONLY)
def open(readonly):
    return fd
def get_size(h):
    return os.fstat(h).st_size
def thread_model():
    import nbdkit
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS
def pread(h, buf, offset, flags):
    os.preadv(h, [buf], offset)
'''

CLIENT = '''
import nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
rng = random.Random(1)
blocks = h.get_size() // 4096
# The same first requests in every run, so the shorter run is a prefix.
for _ in range(int(sys.argv[2])):
    h.pread(4096, rng.randrange(blocks) * 4096)
h.shutdown()
'''


def cases(workdir):
    raw = os.path.join(workdir, "img.raw")
    qcow2 = os.path.join(workdir, "img.qcow2")
    minimal = os.path.join(workdir, "minimal.py")
    with open(minimal, "w") as f:
        f.write(MINIMAL_PLUGIN)
    return raw, qcow2, [
        ("nbdkit file (C)", ["file", raw]),
        ("minimal Python plugin, raw", ["python", minimal, f"file={raw}"]),
        ("nbdplug raw", server.plugin_args(raw, "raw", readonly=True)),
        ("nbdplug qcow2", server.plugin_args(qcow2, "qcow2",
                                             readonly=True)),
    ]


def measure(plugin, requests, workdir):
    """Instructions of an nbdkit run that served `requests` reads, by
    object file."""
    sock = os.path.join(workdir, "s.sock")
    out = os.path.join(workdir, "cg.out")
    for path in (sock, sock + ".pid", out):
        if os.path.exists(path):
            os.unlink(path)
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
         "nbdkit", "-f", "-r", "-U", sock, "-P", sock + ".pid"] + plugin,
        env=server.nbdkit_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        server.wait_pidfile(sock + ".pid", timeout=120, child=proc)
        subprocess.run(["/usr/bin/python3", "-c", CLIENT,
                        server.unix_uri(sock), str(requests)], check=True)
    finally:
        proc.terminate()
        proc.wait()
    ann = subprocess.run(["callgrind_annotate", "--threshold=100", out],
                         capture_output=True, text=True).stdout
    by_object = collections.Counter()
    for line in ann.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(\S+):.*\[(.+)\]$", line)
        if m:
            by_object[os.path.basename(m.group(3))] += \
                int(m.group(1).replace(",", ""))
    return by_object


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--out", default=os.path.join(REPO, "bench",
                                                      "results"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="nbdplug-profile.", dir="/var/tmp")
    raw, qcow2, runs = cases(workdir)
    subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M",
                    f"count={SIZE // MiB}", "status=none"], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2],
                   check=True)
    results = {}
    for name, plugin in runs:
        t = time.monotonic()
        idle = measure(plugin, args.warmup, workdir)
        busy = measure(plugin, args.warmup + args.requests, workdir)
        per = {obj: (busy[obj] - idle.get(obj, 0)) / args.requests
               for obj in busy}
        per = {k: v for k, v in per.items() if v >= 50}
        results[name] = dict(sorted(per.items(), key=lambda kv: -kv[1]))
        print(f"{name}: {sum(per.values()):,.0f} instructions/request "
              f"({time.monotonic() - t:.0f} s)", flush=True)
    lines = ["| server | instructions per 4 KiB read | where |",
             "|---|---|---|"]
    for name, per in results.items():
        where = ", ".join(f"{k} {v:,.0f}" for k, v in list(per.items())[:5])
        lines.append(f"| {name} | {sum(per.values()):,.0f} | {where} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table)
    subprocess.run(["rm", "-rf", workdir])


if __name__ == "__main__":
    main()
