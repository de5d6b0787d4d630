"""Moving a disk (`nbdplug migrate`), measured in one run:

- fill: a 4 GiB source, half allocated (1 MiB of data, 1 MiB of hole),
  served by nbdplug on a Unix socket; `nbdplug migrate start` (the whole
  command, until the move is complete and durable) against `nbdcopy
  --flush` of the same export into a file.  Throughput is the source's
  allocated bytes over the wall time; the ratio is nbdplug / nbdcopy
  (goal: at least 0.8).  (A disk that small moves in about a second,
  so the command's start-up counts for a tenth of it.)
- latency: a moving disk served by nbdplug (a 4 GiB source, all data),
  its first 128 MiB made local by reading them (copy-on-read); fio
  4 KiB random reads at QD1 over those 128 MiB while the server fills
  the rest at full speed, then the same after the move is complete (an
  idle disk); mean completion latency, ratio during / idle (goal: at
  most 1.5).  The table says if the fill ended before a run did.
"""

import json
import os
import subprocess
import sys
import time

from common import (MiB, REPO, RAMP_SECONDS, ROUNDS, RUNTIME, make_image,
                    nbdplug_server, summary)

GiB = 1 << 30
SIZE = 4 * GiB
LOCAL_SPAN = 128 * MiB


def _nbdplug(*args, env):
    return subprocess.run([sys.executable, "-m", "nbdplug.cli", *args],
                          check=True, capture_output=True, text=True,
                          cwd=REPO, env=env)


def _timed(argv, env=None):
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=REPO,
                   env=env)
    return time.monotonic() - start


def _latency_us(uri, out):
    subprocess.run(
        ["fio", "--name=lat", "--ioengine=nbd", f"--uri={uri}",
         "--rw=randread", "--bs=4k", "--iodepth=1", "--time_based",
         f"--runtime={RUNTIME}s",
         f"--ramp_time={int(RAMP_SECONDS * 1000)}ms",
         f"--size={LOCAL_SPAN}", "--randrepeat=0", "--output-format=json",
         f"--output={out}"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)["jobs"][0]["read"]["clat_ns"]["mean"] / 1000


def run(workdir):
    env = dict(os.environ, NBDPLUG_STATE_DIR=os.path.join(workdir, "state"))
    src = os.path.join(workdir, "migrate-src.raw")
    make_image(src, "raw", size=SIZE, half=True)
    allocated = SIZE // 2
    local = os.path.join(workdir, "local.qcow2")
    copy = os.path.join(workdir, "copy.raw")
    times = {"nbdplug": [], "nbdcopy": []}
    lat = {"during fill": [], "idle": []}
    still_filling = []
    with nbdplug_server(src, "raw", os.path.join(workdir, "src.sock")) \
            as source:
        uri = source.uri
        for _ in range(ROUNDS):
            times["nbdplug"].append(_timed(
                [sys.executable, "-m", "nbdplug.cli", "migrate", "start",
                 uri, local], env))
            _remove(local)
            times["nbdcopy"].append(_timed(["nbdcopy", "--flush", uri,
                                            copy]))
            os.unlink(copy)
        full = os.path.join(workdir, "migrate-full.raw")
        _allocated_image(full, SIZE)
    with nbdplug_server(full, "raw", os.path.join(workdir, "full.sock")) \
            as source:
        _in_the_background(source.pid)
        uri = source.uri
        for _ in range(ROUNDS):
            _nbdplug("migrate", "start", "--no-wait", uri, local, env=env)
            sock = os.path.join(workdir, "local.sock")
            with _served(local, sock, env) as luri:
                subprocess.run(["fio", "--name=warm", "--ioengine=nbd",
                                f"--uri={luri}", "--rw=read", "--bs=1M",
                                f"--size={LOCAL_SPAN}"], check=True,
                               stdout=subprocess.DEVNULL)
                lat["during fill"].append(_latency_us(
                    luri, os.path.join(workdir, "fio.json")))
                st = json.loads(_nbdplug("migrate", "status",
                                         "--output=json", local,
                                         env=env).stdout)
                still_filling.append(st["state"] == "filling")
                while st["state"] != "done":
                    time.sleep(0.2)
                    st = json.loads(_nbdplug("migrate", "status",
                                             "--output=json", local,
                                             env=env).stdout)
                lat["idle"].append(_latency_us(
                    luri, os.path.join(workdir, "fio.json")))
            _remove(local)
        os.unlink(full)
    os.unlink(src)
    fill = {tool: summary([allocated / MiB / t for t in ts], "MiB/s")
            for tool, ts in times.items()}
    fill["ratio"] = fill["nbdplug"]["median"] / fill["nbdcopy"]["median"]
    latency = {k: summary(v, "us") for k, v in lat.items()}
    latency["ratio"] = latency["during fill"]["median"] / \
        latency["idle"]["median"]
    latency["fill ran throughout"] = all(still_filling)
    print(f"migrate fill {fill['nbdplug']['median']:.0f} MiB/s, nbdcopy "
          f"{fill['nbdcopy']['median']:.0f} MiB/s: {fill['ratio']:.2f}x; "
          f"4K read latency during fill "
          f"{latency['during fill']['median']:.0f} us, idle "
          f"{latency['idle']['median']:.0f} us: {latency['ratio']:.2f}x",
          flush=True)
    return {"fill": fill, "latency": latency}


class _served:
    """`nbdplug serve` of the moving disk (its server fills it)."""

    def __init__(self, image, sock, env):
        self.image, self.sock, self.env = image, sock, env

    def __enter__(self):
        _nbdplug("serve", "--socket", self.sock, "--pidfile",
                 self.sock + ".pid", "-f", "qcow2", self.image, env=self.env)
        return f"nbd+unix:///?socket={self.sock}"

    def __exit__(self, *exc):
        _nbdplug("stop", self.sock + ".pid", env=self.env)


def _in_the_background(pid):
    """The source's server at nice 19, every thread of it (the threads it
    makes later inherit that): it stands for another host, whose CPU time
    the local reads would not compete with."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), 19)


def _allocated_image(path, size):
    """A raw image of data throughout (a random MiB over and over: quick
    to write, and nothing in the path looks at it)."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
    os.sync()


def _remove(local):
    for path in (local, local + ".migration"):
        if os.path.exists(path):
            os.unlink(path)


def markdown(results):
    f, lt = results["fill"], results["latency"]
    lines = ["\n**migrate** (median [min-max] of the rounds)\n",
             "| measure | nbdplug | peer | ratio |", "|---|---|---|---|",
             f"| fill, {SIZE // GiB} GiB half allocated (vs nbdcopy "
             f"--flush) | "
             f"{_cell(f['nbdplug'])} | {_cell(f['nbdcopy'])} | "
             f"{f['ratio']:.2f}x |",
             f"| 4K random read latency on local clusters, during the fill "
             f"(vs idle) | {_cell(lt['during fill'])} | {_cell(lt['idle'])}"
             f" | {lt['ratio']:.2f}x |"]
    if not lt["fill ran throughout"]:
        lines.append("\n(the fill ended before a latency run did)")
    return "\n".join(lines) + "\n"


def _cell(s):
    return f"{s['median']:.0f} {s['unit']} [{s['min']:.0f}-{s['max']:.0f}]"
