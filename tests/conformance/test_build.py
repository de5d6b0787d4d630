"""Each fixture is what formats.py says: the reference reads the layout."""

from conformance.formats import MiB, SIZE


def test_fixture_holds_the_layout(fixture):
    data = fixture.reference_bytes()
    assert len(data) >= SIZE          # vpc rounds up to its geometry
    assert data[:MiB] == b"\xa1" * MiB
    assert data[2 * MiB:3 * MiB] == bytes(MiB)
    assert data[3 * MiB:3 * MiB + MiB // 2] == b"\xb2" * (MiB // 2)
