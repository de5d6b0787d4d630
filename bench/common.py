"""What the benchmarks share: rounds and run times, the servers under
test (with the CPU time they use), fio as the NBD client, test images,
and summarising rounds."""

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import typing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nbdplug.serve import nbdkit as server  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
LONG = os.environ.get("BENCH_LONG") == "1"
ROUNDS = 5 if LONG else 3
RUNTIME = 10 if LONG else 1         # seconds measured per fio run
RAMP_SECONDS = 1 if LONG else 0.5   # fio ramp before measuring
RESULTS = os.path.join(REPO, "bench", "results")


class Running(typing.NamedTuple):
    uri: str
    pid: int


@contextlib.contextmanager
def nbdplug_server(image, fmt, sock, filters=(), filter_args=(),
                   plugin=server.PLUGIN):
    args = server.plugin_args(image, fmt)
    args[1] = plugin
    argv = ["nbdkit", "-U", sock, "-P", sock + ".pid", *filters] + args + \
        list(filter_args)
    with _daemon(argv, sock + ".pid") as pid:
        yield Running(server.unix_uri(sock), pid)


def nbdplug_all_requests_server(image, fmt, sock):
    """nbdplug under the thread model it had before issue 14, which
    nbdkit's noparallel filter imposes: one request at a time across all
    connections, handshakes included."""
    return nbdplug_server(image, fmt, sock, ["--filter=noparallel"],
                          ["serialize=all-requests"])


def nbdplug_parallel_server(image, fmt, sock):
    """nbdplug under PARALLEL (nbdkit's 16 worker threads a connection):
    a copy of the plugin beside the socket whose thread_model says so."""
    with open(server.PLUGIN) as f:
        source = f.read()
    patched = source.replace("return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS",
                             "return nbdkit.THREAD_MODEL_PARALLEL")
    assert patched != source, "plugin.py no longer reads as expected"
    plugin = os.path.join(os.path.dirname(sock), "plugin_parallel.py")
    with open(plugin, "w") as f:
        f.write(patched)
    return nbdplug_server(image, fmt, sock, plugin=plugin)


@contextlib.contextmanager
def nbdkit_file_server(image, fmt, sock):
    argv = ["nbdkit", "-U", sock, "-P", sock + ".pid", "file", image]
    with _daemon(argv, sock + ".pid") as pid:
        yield Running(server.unix_uri(sock), pid)


@contextlib.contextmanager
def qemu_nbd_server(image, fmt, sock):
    # --shared=0: any number of clients (idle ones take no one's place);
    # quiet, as it complains of every client leaving mid-handshake.
    proc = subprocess.Popen(["qemu-nbd", "-f", fmt, "--cache=writeback",
                             "-k", sock, "--shared=0", "-t", image],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.01)
        yield Running(server.unix_uri(sock), proc.pid)
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def _daemon(argv, pidfile):
    pid = server.start_background(argv, pidfile)
    try:
        yield pid
    finally:
        server.stop(pidfile)


def cpu_seconds(pid):
    """User and system time process `pid` has used, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVERS = {
    "nbdplug": nbdplug_server,
    "nbdplug-all-requests": nbdplug_all_requests_server,
    "nbdplug-parallel": nbdplug_parallel_server,
    "nbdkit-file": nbdkit_file_server,
    "qemu-nbd": qemu_nbd_server,
}


@contextlib.contextmanager
def idle_clients(sock, count):
    """`count` clients connected to the Unix socket `sock` that never
    begin their handshake."""
    clients = []
    try:
        for _ in range(count):
            clients.append(socket.socket(socket.AF_UNIX))
            clients[-1].connect(sock)
        yield
    finally:
        for c in clients:
            c.close()


def fio(uri, rw, bs, qd, conns, out):
    """(value, unit): MiB/s for 1M blocks, else IOPS; 0 when the server
    does not answer (fio waits for ever)."""
    unit = "MiB/s" if bs == "1M" else "IOPS"
    try:
        subprocess.run(
            ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}",
             f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
             f"--numjobs={conns}", "--group_reporting", "--time_based",
             f"--runtime={RUNTIME}s",
             f"--ramp_time={int(RAMP_SECONDS * 1000)}ms", "--size=1G",
             "--randrepeat=0", "--output-format=json", f"--output={out}"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=3 * RUNTIME + 20)
    except subprocess.TimeoutExpired:
        return 0.0, unit
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return (side["bw_bytes"] / MiB if bs == "1M" else side["iops"]), unit


def make_image(path, fmt, size=GiB, half=False):
    """A `size` image of `fmt`: random data throughout, or (half=True)
    1 MiB of data then 1 MiB of hole, alternating."""
    raw = path + ".src.raw"
    if half:
        chunk = os.urandom(MiB)
        with open(raw, "wb") as f:
            f.truncate(size)
            for off in range(0, size, 2 * MiB):
                f.seek(off)
                f.write(chunk)
    else:
        subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M",
                        f"count={size // MiB}", "status=none"], check=True)
    if fmt == "raw":
        os.rename(raw, path)
    else:
        # qemu-img writes VMDK as monolithicSparse; VHD must be dynamic.
        opts = ["-o", "subformat=dynamic"] if fmt == "vpc" else []
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt,
                        *opts, raw, path], check=True)
        os.unlink(raw)
    os.sync()           # no writeback of the new image under measurements


def summary(values, unit=None):
    out = {"median": statistics.median(values), "min": min(values),
           "max": max(values)}
    if unit:
        out["unit"] = unit
    return out
