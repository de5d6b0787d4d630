"""Fixtures of the conformance suite: each row's image, built once a
session, its reference bytes, and private copies for tests that write."""

import os
import subprocess

import pytest

from conformance.formats import (REFERENCE, ROWS, copy_image, remove_ram,
                                 stop_sources)


class Built:
    """One row's fixture: the image, its directory, the reference raw
    file holding the guest bytes as the reference reader sees them."""

    def __init__(self, row, directory):
        self.row = row
        self.directory = directory
        self.image = row.build(directory)
        self.reference = os.path.join(directory, REFERENCE)
        if row.qemu_reads:
            subprocess.run(["qemu-img", "convert", "-O", "raw", "-f",
                            row.fmt, self.image, self.reference],
                           check=True)

    def reference_bytes(self):
        with open(self.reference, "rb") as f:
            return f.read()


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    made = {}

    def get(row):
        if row.name not in made:
            made[row.name] = Built(row, str(tmp_path_factory.mktemp(
                row.name)))
        return made[row.name]
    yield get
    for b in made.values():
        remove_ram(b.image)
    stop_sources()


@pytest.fixture(params=ROWS, ids=str)
def row(request):
    return request.param


@pytest.fixture
def fixture(built, row):
    return built(row)


@pytest.fixture
def private(fixture, tmp_path):
    """A copy of the row's image to write to; the reference with it."""
    image = copy_image(fixture.image, fixture.directory, str(tmp_path))
    yield image
    remove_ram(image)
