"""make bench is not run by make test: at least every part of it imports
(a renamed helper in bench/common.py once broke the migrate rows)."""

import importlib
import os
import sys

from conftest import REPO


def test_every_bench_part_imports(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    bench = importlib.import_module("bench")
    for part in bench.PARTS:
        importlib.import_module(f"{part}_bench")
    assert sys.modules["common"].SERVERS
