"""`nbdplug info` and `nbdplug map`: what qemu-img info and qemu-img map
say of an image, with their JSON keys and human layout."""

import os


def image_info(disk):
    """qemu-img info's JSON keys where they mean the same."""
    info = {
        "filename": disk.path,
        "format": disk.format_name,
        "virtual-size": disk.size,
        "actual-size": sum(_allocated(p) for p in disk.files()),
    }
    if disk.cluster_size:
        info["cluster-size"] = disk.cluster_size
    info["dirty-flag"] = disk.dirty
    if disk.backing_name:
        info["backing-filename"] = disk.backing_name
        if disk.backing is not None:
            info["full-backing-filename"] = disk.backing.path
        if disk.backing_format:
            info["backing-filename-format"] = disk.backing_format
    if disk.snapshots:
        info["snapshots"] = [s.info() for s in disk.snapshots]
    specific = disk.info()
    if specific:
        info["format-specific"] = {"type": disk.format_name,
                                   "data": specific}
    if disk.backing is not None:
        info["backing-image"] = image_info(disk.backing)
    return info


def _allocated(path):
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _human_size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024


def info_lines(info, indent=""):
    """`info` (image_info's dict) as qemu-img info prints it."""
    yield f"{indent}image: {info['filename']}"
    yield f"{indent}file format: {info['format']}"
    yield (f"{indent}virtual size: {_human_size(info['virtual-size'])} "
           f"({info['virtual-size']} bytes)")
    yield f"{indent}disk size: {_human_size(info['actual-size'])}"
    if "cluster-size" in info:
        yield f"{indent}cluster_size: {info['cluster-size']}"
    if "backing-filename" in info:
        yield f"{indent}backing file: {info['backing-filename']}"
        if "backing-filename-format" in info:
            yield (f"{indent}backing file format: "
                   f"{info['backing-filename-format']}")
    if "format-specific" in info:
        yield f"{indent}Format specific information:"
        yield from _tree_lines(info["format-specific"]["data"],
                               indent + "    ")
    if "backing-image" in info:
        yield f"{indent}backing image:"
        yield from info_lines(info["backing-image"], indent + "    ")


def _tree_lines(value, indent):
    for key, v in value.items():
        if isinstance(v, dict):
            yield f"{indent}{key}:"
            yield from _tree_lines(v, indent + "    ")
        elif isinstance(v, list):
            yield f"{indent}{key}:"
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    yield f"{indent}    [{i}]:"
                    yield from _tree_lines(item, indent + "        ")
                else:
                    yield f"{indent}    [{i}]: {item}"
        else:
            yield f"{indent}{key}: {v}"


def map_entries(disk):
    """`qemu-img map --output=json` entries: adjacent runs merged where
    every field agrees and host offsets continue."""
    out = []
    for run in disk.map(disk.size, 0):
        entry = {"start": run.offset, "length": run.length,
                 "depth": run.depth, "present": run.present,
                 "zero": run.zero, "data": run.data}
        if run.host is not None:
            entry["offset"] = run.host[1]
        if out and _continues(out[-1], entry):
            out[-1]["length"] += entry["length"]
        else:
            out.append(entry)
    return out


def _continues(prev, entry):
    for key in ("depth", "present", "zero", "data"):
        if prev[key] != entry[key]:
            return False
    if ("offset" in prev) != ("offset" in entry):
        return False
    return "offset" not in prev or \
        prev["offset"] + prev["length"] == entry["offset"]


def map_lines(entries, chain):
    """map_entries as qemu-img map prints them; `chain` the paths of the
    image and its backing files."""
    yield (f"{'Offset':<20}{'Length':<20}{'Depth':<7}{'Kind':<11}"
           f"{'Mapped to':<20}File")
    for e in entries:
        kind = "data" if e["data"] else ("zero" if e["zero"] else "hole")
        if not e["present"]:
            kind = "unallocated"
        mapped = f"{e['offset']:#x}" if "offset" in e else "-"
        path = chain[e["depth"]] if e["depth"] < len(chain) else "-"
        yield (f"{e['start']:<#20x}{e['length']:<#20x}{e['depth']:<7}"
               f"{kind:<11}{mapped:<20}{path if 'offset' in e else '-'}")
