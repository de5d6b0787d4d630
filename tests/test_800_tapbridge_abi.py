"""tapbridge.abi against Xen's installed headers: every layout, constant,
ring size and ioctl number, natively and for the x86_32 protocol (gcc
-m32), plus the test frontend's own x86_32 declarations."""

import os
import sys

import pytest

from tapbridge import abi

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tapbridge"))
from tbharness import probe  # noqa: E402

# (our layout, C struct name in the probe)
NATIVE = [
    (abi.X86_64.request, "blkif_request"),
    (abi.X86_64.discard, "blkif_request_discard"),
    (abi.X86_64.indirect, "blkif_request_indirect"),
    (abi.X86_64.response, "blkif_response"),
    (abi.SRING_HEADER, "blkif_sring"),
    (abi.BLKIF_REQUEST_SEGMENT, "blkif_request_segment"),
    (abi.GNTDEV_GRANT_REF, "ioctl_gntdev_grant_ref"),
    (abi.GNTDEV_MAP_GRANT_REF, "ioctl_gntdev_map_grant_ref"),
    (abi.GNTDEV_UNMAP_GRANT_REF, "ioctl_gntdev_unmap_grant_ref"),
    (abi.GNTDEV_GRANT_COPY, "ioctl_gntdev_grant_copy"),
    (abi.GNTDEV_GRANT_COPY_SEGMENT, "ioctl_gntdev_grant_copy_segment"),
    (abi.GNTDEV_GRANT_COPY_FOREIGN, "gntdev_copy_foreign"),
    (abi.EVTCHN_BIND_INTERDOMAIN, "ioctl_evtchn_bind_interdomain"),
    (abi.EVTCHN_PORT, "ioctl_evtchn_notify"),
    (abi.EVTCHN_PORT, "ioctl_evtchn_unbind"),
]
I386 = [
    (abi.X86_32.request, "blkif_request"),
    (abi.X86_32.discard, "blkif_request_discard"),
    (abi.X86_32.indirect, "blkif_request_indirect"),
    (abi.X86_32.response, "blkif_response"),
    (abi.SRING_HEADER, "blkif_sring"),
    (abi.BLKIF_REQUEST_SEGMENT, "blkif_request_segment"),
]
# A field Python cannot name as C does (no leading underscores there).
C_NAMES = {("blkif_sring", "pad"): "__pad"}


def assert_layout(layout, values, cname):
    """Same size, same offset for every field the header names, and
    every other field of ours is padding the compiler inserts."""
    assert layout.size == values[f"{cname}__sizeof"], f"sizeof {cname}"
    declared = set()
    for field in layout.fields:
        cfield = C_NAMES.get((cname, field), field)
        declared.add(cfield)
        key = f"{cname}__{cfield}"
        if key in values:
            assert layout.offset(field) == values[key], f"{cname}.{field}"
        else:
            assert field.startswith("pad"), f"{cname}.{field} is not in C"
    probed = {key.split("__", 1)[1] for key in values
              if key.startswith(cname + "__")} - {"sizeof"}
    assert probed and probed <= declared, probed - declared


@pytest.mark.parametrize("layout,cname", NATIVE,
                         ids=[c for _, c in NATIVE])
def test_native_layouts_match_headers(layout, cname):
    assert_layout(layout, probe(), cname)


@pytest.mark.parametrize("layout,cname", I386, ids=[c for _, c in I386])
def test_x86_32_layouts_match_headers_compiled_m32(layout, cname):
    assert_layout(layout, probe(i386=True), cname)


def test_frontend_x86_32_declarations_match_m32():
    """The C frontend's pack(4) structs equal blkif.h under -m32, so a
    frontend driving the x86_32 protocol in tests is the real ABI."""
    native, i386 = probe(), probe(i386=True)
    ours = {k.replace("blkif_x86_32", "blkif", 1): v
            for k, v in native.items() if k.startswith("blkif_x86_32")}
    theirs = {k: v for k, v in i386.items() if k in ours}
    assert ours == theirs
    assert len(ours) > 20


@pytest.mark.parametrize("protocol,values", [
    (abi.X86_64, lambda: probe()), (abi.X86_32, lambda: probe(True))],
    ids=["x86_64", "x86_32"])
def test_ring_size_and_stride_match_ring_h(protocol, values):
    v = values()
    assert protocol.stride == v["blkif_sring_entry__sizeof"]
    for order in range(5):
        assert protocol.ring_size(4096 << order) == \
            v[f"blkif_ring_size_order{order}"] == 32 << order


def test_ring_size_rounds_down_to_a_power_of_two():
    assert abi.X86_64.ring_size(64 + 112 * 36) == 32
    assert abi.X86_64.ring_size(64 + 112 * 64) == 64
    assert abi.X86_64.ring_size(64 + 112 * 64 - 1) == 32
    with pytest.raises(ValueError):
        abi.X86_64.ring_size(64 + 111)


CONSTANTS = """BLKIF_OP_READ BLKIF_OP_WRITE BLKIF_OP_WRITE_BARRIER
BLKIF_OP_FLUSH_DISKCACHE BLKIF_OP_RESERVED_1 BLKIF_OP_DISCARD
BLKIF_OP_INDIRECT BLKIF_MAX_SEGMENTS_PER_REQUEST
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST BLKIF_DISCARD_SECURE BLKIF_RSP_OKAY
BLKIF_RSP_ERROR BLKIF_RSP_EOPNOTSUPP VDISK_CDROM VDISK_REMOVABLE
VDISK_READONLY XenbusStateUnknown XenbusStateInitialising
XenbusStateInitWait XenbusStateInitialised XenbusStateConnected
XenbusStateClosing XenbusStateClosed XenbusStateReconfiguring
XenbusStateReconfigured GNTCOPY_source_gref GNTCOPY_dest_gref GNTST_okay
GNTST_bad_gntref GNTST_permission_denied IOCTL_GNTDEV_MAP_GRANT_REF
IOCTL_GNTDEV_UNMAP_GRANT_REF IOCTL_GNTDEV_GRANT_COPY
IOCTL_EVTCHN_BIND_INTERDOMAIN IOCTL_EVTCHN_UNBIND
IOCTL_EVTCHN_NOTIFY""".split()


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_headers(name):
    assert getattr(abi, name) == probe()[name]


def test_ioctl_numbers_as_measured():
    # _IOC(_IOC_NONE, ...): no direction bits, size in bits 16..29
    assert abi.IOCTL_GNTDEV_MAP_GRANT_REF == 0x00184700
    assert abi.IOCTL_GNTDEV_GRANT_COPY == 0x00104708
    assert abi.IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x00084501
    assert abi.IOCTL_EVTCHN_NOTIFY == 0x00044504


def test_protocol_names_match_protocols_h():
    values = probe()
    assert abi.XEN_IO_PROTO_ABI_NATIVE == values["XEN_IO_PROTO_ABI_NATIVE_"]
    assert abi.X86_64.name == values["XEN_IO_PROTO_ABI_X86_64_"]
    assert abi.X86_32.name == values["XEN_IO_PROTO_ABI_X86_32_"]
    assert probe(i386=True)["XEN_IO_PROTO_ABI_NATIVE_"] == abi.X86_32.name
    assert abi.SEGMENTS_PER_INDIRECT_PAGE == 512
