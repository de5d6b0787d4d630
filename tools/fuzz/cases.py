"""Regression cases: fuzzed images that once showed a bad class, kept
xz-compressed under tests/fuzz_cases with an index (cases.json) saying
where each came from and what it showed."""

import hashlib
import json
import lzma
import os
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
DIRECTORY = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests",
                         "fuzz_cases")
INDEX = os.path.join(DIRECTORY, "cases.json")
_LOCK = threading.Lock()          # fuzz lanes are threads


def load_index():
    if not os.path.exists(INDEX):
        return []
    with open(INDEX) as f:
        return json.load(f)


def save(image, fmt, seed_name, seed, number, mutation, verdict):
    """Keep `image` as a case (once per content)."""
    with _LOCK:
        _save(image, fmt, seed_name, seed, number, mutation, verdict)


def _save(image, fmt, seed_name, seed, number, mutation, verdict):
    with open(image, "rb") as f:
        data = f.read()
    name = f"{fmt}-{hashlib.sha256(data).hexdigest()[:12]}.xz"
    index = load_index()
    if any(entry["file"] == name for entry in index):
        return
    os.makedirs(DIRECTORY, exist_ok=True)
    with open(os.path.join(DIRECTORY, name), "wb") as f:
        f.write(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    index.append({"file": name, "format": fmt, "seed": seed_name,
                  "case": f"--seed {seed} --first {number}",
                  "mutation": mutation, "found": verdict.bad})
    index.sort(key=lambda entry: entry["file"])
    with open(INDEX + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    os.replace(INDEX + ".tmp", INDEX)


def unpack(entry, directory):
    """Write case `entry`'s image into `directory`; return its path."""
    with open(os.path.join(DIRECTORY, entry["file"]), "rb") as f:
        data = lzma.decompress(f.read())
    path = os.path.join(directory, "case." + entry["format"])
    with open(path, "wb") as f:
        f.write(data)
    return path
