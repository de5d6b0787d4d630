"""The differential fuzzer's regression cases (tests/fuzz_cases, kept by
`make fuzz`): each image that once showed a bad class is judged again
against qemu-img and must show none."""

import json
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools", "fuzz"))
import cases  # noqa: E402
import run  # noqa: E402

CASES = cases.load_index()


@pytest.fixture(scope="module")
def worker():
    w = run.Worker()
    yield w
    w.close()


@pytest.mark.parametrize("entry", CASES, ids=[e["file"] for e in CASES])
def test_fuzz_case(entry, tmp_path, worker):
    image = cases.unpack(entry, str(tmp_path))
    verdict = run.judge(image, entry["format"], str(tmp_path), worker)
    assert not verdict.bad, json.dumps({"case": entry, "now": verdict.bad,
                                        "facts": verdict.facts}, indent=1)
