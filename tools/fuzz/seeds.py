"""Seed images: one small image for each shape of each format, written by
qemu-img and qemu-io (nbdplug where qemu cannot), holding data, zeros,
holes and, where the format has them, compressed clusters, snapshots and
bitmaps.  Small, so a mutated copy is quick to run and, compressed, a
small regression case."""

import os
import subprocess

KiB, MiB = 1 << 10, 1 << 20


def _run(argv):
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{argv}: {proc.stderr.strip()}")


def _image(fmt, options, size, commands, extra=()):
    def build(path):
        argv = ["qemu-img", "create", "-q", "-f", fmt]
        if options:
            argv += ["-o", options]
        _run(argv + [path, str(size)])
        io = ["qemu-io", "-f", fmt]
        for command in commands:
            io += ["-c", command]
        if commands:
            _run(io + [path])
        for step in extra:
            _run([a.replace("IMAGE", path) for a in step])
    return build


def _converted(fmt, options, size, commands):
    """An image qemu-img only writes by conversion (streamOptimized)."""
    def build(path):
        raw = path + ".src"
        _image("raw", "", size, commands)(raw)
        _run(["qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", options,
              raw, path])
        os.unlink(raw)
    return build


DATA = ["write -P 0x11 0 64k", "write -P 0x22 192k 8k",
        "write -P 0x33 1M 4k", "write -z 1088k 64k"]

# name: (format, builder)
SEEDS = {
    "qcow2-v3": ("qcow2", _image(
        "qcow2", "cluster_size=4k", 2 * MiB,
        DATA + ["write -c -P 0x44 1536k 4k", "discard 192k 4k"],
        extra=[["qemu-img", "snapshot", "-c", "s1", "IMAGE"],
               ["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 8k 4k",
                "IMAGE"],
               ["qemu-img", "bitmap", "--add", "IMAGE", "b0"]])),
    "qcow2-v2": ("qcow2", _image(
        "qcow2", "compat=0.10,cluster_size=512", 512 * KiB,
        ["write -P 0x11 0 4k", "write -P 0x22 64k 1k",
         "write -c -P 0x33 128k 512"])),
    "qcow2-64k": ("qcow2", _image(
        "qcow2", "", 2 * MiB, DATA,
        extra=[["qemu-img", "snapshot", "-c", "s1", "IMAGE"]])),
    "qcow2-extl2": ("qcow2", _image(
        "qcow2", "extended_l2=on,cluster_size=16k", 2 * MiB,
        ["write -P 0x11 0 1k", "write -P 0x22 4k 2k", "write -z 16k 1k",
         "write -P 0x33 64k 16k", "write -c -P 0x44 128k 16k"])),
    "qcow2-refbits": ("qcow2", _image(
        "qcow2", "cluster_size=4k,refcount_bits=1,lazy_refcounts=on",
        1 * MiB, ["write -P 0x11 0 8k", "write -P 0x22 512k 4k"])),
    "qcow": ("qcow", _image(
        "qcow", "", 1 * MiB,
        ["write -P 0x11 0 8k", "write -P 0x22 512k 4k",
         "write -c -P 0x33 768k 4k"])),
    "vmdk-sparse": ("vmdk", _image(
        "vmdk", "", 2 * MiB, DATA)),
    "vmdk-zeroed": ("vmdk", _image(
        "vmdk", "zeroed_grain=on", 2 * MiB, DATA)),
    "vmdk-stream": ("vmdk", _converted(
        "vmdk", "subformat=streamOptimized", 2 * MiB, DATA)),
    "vpc-dynamic": ("vpc", _image(
        "vpc", "", 2 * MiB, DATA + ["discard 192k 8k"])),
    "vpc-fixed": ("vpc", _image(
        "vpc", "subformat=fixed,force_size=on", 512 * KiB,
        ["write -P 0x11 0 4k"])),
    "vhdx": ("vhdx", _image(
        "vhdx", "block_size=1M,log_size=1M", 4 * MiB,
        ["write -P 0x11 0 64k", "write -P 0x22 1M 4k",
         "write -z 2M 1M"])),
}


def build_seeds(directory, names=None):
    """Build the seeds (all, or those named) in `directory`; return
    [(name, format, path)]."""
    os.makedirs(directory, exist_ok=True)
    out = []
    for name, (fmt, build) in SEEDS.items():
        if names and name not in names and fmt not in names:
            continue
        path = os.path.join(directory, f"{name}.{fmt}")
        if not os.path.exists(path):
            build(path)
        out.append((name, fmt, path))
    return out
