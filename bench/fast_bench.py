"""The fast device next to its peers, in the kernel lane (this kernel
has no NBD or device-mapper): one boot of Debian's kernel under QEMU
(tools/kernel-lane.sh's way), every row measured in that one run.

Images live on ext4 over a RAM block device (brd), as on a host's disk,
so loop devices take O_DIRECT as they would there.  A fully allocated
qcow2 (written in guest order) is attached as the fast device, a copy
of it through NBD only (--via nbd), and its raw twin with losetup
--direct-io (what the fast path's own loop devices are).  fio (libaio,
O_DIRECT) runs 4 KiB random and 1 MiB sequential reads and writes at
QD16 on each, the three in turn in every round, so a slower moment of a
busy machine falls on all of them.

Also: the promotion delay (an O_DIRECT write to a new cluster of an
empty image until the live table maps it straight to the file), the
table sizes (the allocated image; an empty one after random 64 KiB
writes, bounded at MAX_TARGETS), and 4 KiB write + fsync at QD1 on both,
what a flush costs as the table grows (it goes to every target).

    .venv/bin/python bench/fast_bench.py          # about 5 minutes
"""

import argparse
import contextlib
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import MiB, REPO, ROUNDS, RUNTIME, summary

WORKLOADS = [
    ("rand read 4K QD16", "randread", "4k", 16),
    ("rand write 4K QD16", "randwrite", "4k", 16),
    ("seq read 1M QD16", "read", "1M", 16),
    ("seq write 1M QD16", "write", "1M", 16),
]
SIZE = 384 * MiB
PROMOTIONS = 20
LANE_RUNTIME = max(RUNTIME, 3)     # seconds a fio run: TCG is noisy


# --- outside: boot the lane -------------------------------------------------

def run(workdir):
    """Boot the kernel lane once and measure everything inside it."""
    kernel = sorted(os.listdir("/boot"))
    kernel = [k for k in kernel if k.startswith("vmlinuz-")][-1]
    out = os.path.join(REPO, "build", "fast-bench.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out)
    env = dict(os.environ, PATH=os.path.join(REPO, ".venv", "bin") + ":" +
               os.environ["PATH"])
    inner = (f"cd {REPO} && .venv/bin/python bench/fast_bench.py "
             f"--inside {out}")
    subprocess.run(["vng", "--disable-kvm", "--run", f"/boot/{kernel}",
                    "--memory", "4G", "--cpus", "2", "--rwdir", REPO,
                    "--exec", inner], env=env, stdin=subprocess.DEVNULL,
                   check=True)
    with open(out) as f:
        return json.load(f)


def markdown(results):
    out = ["", "fast device (kernel lane, QEMU TCG): ratio to the peer", "",
           "| workload | fast | loop on raw | ratio | NBD only | ratio |",
           "|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        unit = row["fast"]["unit"]
        out.append(f"| {name} | {row['fast']['median']:.0f} {unit} | "
                   f"{row['loop']['median']:.0f} | {row['vs loop']:.2f} | "
                   f"{row['nbd']['median']:.0f} | {row['vs nbd']:.2f} |")
    p = results["promotion"]
    out += ["", f"promotion delay (write to a new cluster until it is "
            f"direct): median {p['median']:.0f} ms, max {p['max']:.0f} ms "
            f"over {p['count']} writes"]
    dio = results["tables"]["a fully allocated qcow2"]["loop-dio"]
    out.append(f"loop devices with direct I/O: {'yes' if all(dio) else 'no'}")
    for name, t in results["tables"].items():
        out.append(f"table of {name}: {t['targets']} targets, "
                   f"{t['direct-targets']} direct, "
                   f"{t['direct-bytes'] / MiB:.0f} of "
                   f"{t['plain-bytes'] / MiB:.0f} MiB plain mapped direct; "
                   f"4K write+fsync QD1 {t['fsync-iops']:.0f} IOPS")
    return "\n".join(out) + "\n"


# --- inside the lane -------------------------------------------------------

def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True,
                          capture_output=True, text=True, **kw).stdout


def fio(dev, rw, bs, qd, runtime=LANE_RUNTIME, extra=()):
    out = sh("fio", "--name=b", f"--filename={dev}", "--direct=1",
             "--ioengine=libaio", f"--rw={rw}", f"--bs={bs}",
             f"--iodepth={qd}", "--time_based", f"--runtime={runtime}s",
             "--ramp_time=500ms", "--randrepeat=0", "--output-format=json",
             *extra)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    if bs == "1M":
        return side["bw_bytes"] / MiB, "MiB/s"
    return side["iops"], "IOPS"


def measure(devs):
    """{workload: {name: summary}} for {name: block device}, the devices
    taking turns within each round."""
    rows = {}
    for name, rw, bs, qd in WORKLOADS:
        values = {d: [] for d in devs}
        for _ in range(ROUNDS):
            for d, dev in devs.items():
                values[d].append(fio(dev, rw, bs, qd))
        rows[name] = {d: summary([v for v, _ in vs], vs[0][1])
                      for d, vs in values.items()}
    return rows


@contextlib.contextmanager
def attached(image, via):
    from hotplug import attach
    rec = attach.attach(image, "qcow2", via=via)
    try:
        yield rec
    finally:
        attach.detach(rec["device"])


@contextlib.contextmanager
def loop(path):
    from hotplug import devices
    dev = devices.loop_attach(path, False, options=["--direct-io=on"])
    try:
        yield dev
    finally:
        devices.loop_detach(dev)


def table_of(rec):
    from dm import manager
    return manager.request(rec["control"], "status")


def settled(rec, timeout=120):
    """The manager's figures once it has taken in every request."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        t = table_of(rec)
        if not t["pending"] and last and last["reloads"] == t["reloads"]:
            return t
        last = t
        time.sleep(0.5)
    return last


def promotion_delays(rec):
    """Seconds from an O_DIRECT 4K write to a new cluster until the live
    table maps it straight to the file."""
    from dm import manager
    fd = os.open(rec["device"], os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    buf[:] = b"\x5a" * 4096
    delays = []
    try:
        for i in range(PROMOTIONS):
            offset = (i * 7 + 3) * MiB
            os.pwrite(fd, buf, offset)
            done = time.monotonic()
            while manager.request(rec["control"], "where",
                                  offset=offset)["where"] != "direct":
                time.sleep(0.002)
            delays.append(time.monotonic() - done)
            time.sleep(0.2)
    finally:
        os.close(fd)
    return delays


def inside(out):
    sys.path.insert(0, REPO)
    os.environ["NBDPLUG_RUN_DIR"] = tempfile.mkdtemp(prefix="run.")
    mnt = tempfile.mkdtemp(prefix="fast-bench.")
    sh("modprobe", "brd", "rd_nr=1", f"rd_size={4 * SIZE // 1024}")
    sh("mkfs.ext4", "-q", "-F", "/dev/ram0")
    sh("mount", "/dev/ram0", mnt)
    try:
        results = _inside(mnt)
    finally:
        subprocess.run(["umount", mnt])
        subprocess.run(["rmmod", "brd"])
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


def _inside(d):
    raw, full, copy, empty = (os.path.join(d, n) for n in (
        "disk.raw", "full.qcow2", "copy.qcow2", "empty.qcow2"))
    sh("qemu-img", "create", "-q", "-f", "raw", raw, str(SIZE))
    sh("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {SIZE}", raw)
    for qcow2 in (full, copy):
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2)
    sh("qemu-img", "create", "-q", "-f", "qcow2", empty, str(SIZE // 2))
    os.sync()
    results = {"rows": {}, "tables": {}}
    with attached(full, "fast") as rec, loop(raw) as peer, \
            attached(copy, "nbd") as nbd:
        t = table_of(rec)
        t["loop-dio"] = [_dio(dev) for dev in rec["loops"].values()]
        rows = measure({"fast": rec["device"], "loop": peer,
                        "nbd": nbd["device"]})
        t["fsync-iops"] = fio(rec["device"], "randwrite", "4k", 1,
                              extra=["--fsync=1"])[0]
        results["tables"]["a fully allocated qcow2"] = t
    for name, row in rows.items():
        row["vs loop"] = row["fast"]["median"] / row["loop"]["median"]
        row["vs nbd"] = row["fast"]["median"] / row["nbd"]["median"]
        results["rows"][name] = row
    with attached(empty, "fast") as rec:
        delays = promotion_delays(rec)
        results["promotion"] = {"median": statistics.median(delays) * 1000,
                                "max": max(delays) * 1000,
                                "count": len(delays)}
        # Random 64 KiB writes: clusters allocated in random order, so
        # few continue each other in the file.
        sh("fio", "--name=f", f"--filename={rec['device']}", "--direct=1",
           "--ioengine=libaio", "--rw=randwrite", "--bs=64k",
           "--iodepth=16", f"--number_ios={SIZE // 2 // (64 << 10) // 2}",
           "--randrepeat=0")
        t = settled(rec)
        t["fsync-iops"] = fio(rec["device"], "randwrite", "4k", 1,
                              extra=["--fsync=1"])[0]
        results["tables"]["a qcow2 after random 64K writes"] = t
    return results


def _dio(dev):
    with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
        return f.read().strip() == "1"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inside", metavar="OUT",
                        help="(in the lane) measure, write JSON to OUT")
    args = parser.parse_args()
    if args.inside:
        inside(args.inside)
        return
    results = run(tempfile.gettempdir())
    print(markdown(results))


if __name__ == "__main__":
    main()
