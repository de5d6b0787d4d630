"""The Xen transport's requests to /dev/xen/gntdev and /dev/xen/evtchn,
byte by byte against the layouts of Xen's installed headers (there is no
hypervisor here to take them)."""

import ctypes
import os
import struct
import sys

import pytest

from tapbridge import abi, xen

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tapbridge"))
from tbharness import probe  # noqa: E402


def u32(buf, offset):
    return struct.unpack_from("<I", buf, offset)[0]


def test_map_grant_ref_request():
    v = probe()
    req = xen.map_grant_ref_request(7, [901, 17, 4242])
    assert len(req) == v["ioctl_gntdev_map_grant_ref__sizeof"] + \
        3 * v["ioctl_gntdev_grant_ref__sizeof"]
    assert u32(req, v["ioctl_gntdev_map_grant_ref__count"]) == 3
    refs = v["ioctl_gntdev_map_grant_ref__sizeof"]
    for i, ref in enumerate((901, 17, 4242)):       # in ring-ref order
        at = refs + i * v["ioctl_gntdev_grant_ref__sizeof"]
        assert u32(req, at + v["ioctl_gntdev_grant_ref__domid"]) == 7
        assert u32(req, at + v["ioctl_gntdev_grant_ref__ref"]) == ref
    # The kernel writes the mmap offset back into the same buffer.
    struct.pack_into("<Q", req, v["ioctl_gntdev_map_grant_ref__index"],
                     0x5000)
    assert abi.GNTDEV_MAP_GRANT_REF.unpack_from(req).index == 0x5000


def test_unmap_grant_ref_request():
    v = probe()
    req = xen.unmap_grant_ref_request(0x5000, 4)
    assert len(req) == v["ioctl_gntdev_unmap_grant_ref__sizeof"]
    assert struct.unpack_from(
        "<Q", req, v["ioctl_gntdev_unmap_grant_ref__index"])[0] == 0x5000
    assert u32(req, v["ioctl_gntdev_unmap_grant_ref__count"]) == 4


@pytest.mark.parametrize("to_guest", [True, False],
                         ids=["read-to-guest", "write-from-guest"])
def test_grant_copy_segment(to_guest):
    v = probe()
    seg = xen.copy_segment(0x7F0012345000, 3, 901, 1024, 2048, to_guest)
    assert len(seg) == v["ioctl_gntdev_grant_copy_segment__sizeof"]
    source = v["ioctl_gntdev_grant_copy_segment__source"]
    dest = v["ioctl_gntdev_grant_copy_segment__dest"]
    foreign, local = (dest, source) if to_guest else (source, dest)
    assert struct.unpack_from("<Q", seg, local)[0] == 0x7F0012345000
    assert u32(seg, foreign + v["gntdev_copy_foreign__ref"]) == 901
    # gntdev orders ref, offset, domid (the hypercall: ref, domid, offset)
    assert struct.unpack_from(
        "<HH", seg, foreign + v["gntdev_copy_foreign__offset"]) == (1024, 3)
    assert v["gntdev_copy_foreign__domid"] == \
        v["gntdev_copy_foreign__offset"] + 2
    assert struct.unpack_from(
        "<H", seg, v["ioctl_gntdev_grant_copy_segment__len"])[0] == 2048
    flags = struct.unpack_from(
        "<H", seg, v["ioctl_gntdev_grant_copy_segment__flags"])[0]
    assert flags == (v["GNTCOPY_dest_gref"] if to_guest
                     else v["GNTCOPY_source_gref"])


def test_grant_copy_request_points_at_the_segments():
    v = probe()
    segs = ctypes.create_string_buffer(48)
    req = xen.grant_copy_request(ctypes.addressof(segs), 2)
    assert len(req) == v["ioctl_gntdev_grant_copy__sizeof"]
    assert u32(req, v["ioctl_gntdev_grant_copy__count"]) == 2
    assert struct.unpack_from(
        "<Q", req, v["ioctl_gntdev_grant_copy__segments"])[0] == \
        ctypes.addressof(segs)


def test_event_channel_requests():
    v = probe()
    req = xen.bind_interdomain_request(5, 33)
    assert len(req) == v["ioctl_evtchn_bind_interdomain__sizeof"]
    assert u32(req, v["ioctl_evtchn_bind_interdomain__remote_domain"]) == 5
    assert u32(req, v["ioctl_evtchn_bind_interdomain__remote_port"]) == 33
    req = xen.port_request(12)
    assert len(req) == v["ioctl_evtchn_notify__sizeof"] == \
        v["ioctl_evtchn_unbind__sizeof"]
    assert u32(req, v["ioctl_evtchn_notify__port"]) == 12


def test_without_xen_the_transport_fails_in_one_line():
    assert not os.path.exists(xen.GNTDEV)
    with pytest.raises(FileNotFoundError, match="gntdev"):
        xen.XenTransport(1, [8], 0, 3)
    with pytest.raises(ValueError, match="2 ring refs for order 0"):
        xen.XenTransport(1, [8, 9], 0, 3)
