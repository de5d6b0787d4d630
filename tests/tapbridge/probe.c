/*
 * Layouts and constants of Xen's installed headers, for the ABI tests.
 * Compiled with -S, natively and (with -DPROBE_I386) as
 * gcc -m32 -ffreestanding; each value is one "const int probe_NAME"
 * whose .long the test reads from the assembly (strings: .string).  Struct fields appear as
 * STRUCT__FIELD (byte offset) and STRUCT__sizeof.
 */
#include <stddef.h>
#include <stdint.h>
#include <xen/io/blkif.h>
#include <xen/io/protocols.h>

#define V(name, value) const int probe_##name = (value);
#define K(name) const int probe_##name = (name);
#define OFF(s, f) V(s##__##f, offsetof(struct s, f))
#define SIZE(s) V(s##__sizeof, sizeof(struct s))

#define BLKIF_STRUCTS(P)                                                \
    SIZE(P##_request) OFF(P##_request, operation)                       \
    OFF(P##_request, nr_segments) OFF(P##_request, handle)              \
    OFF(P##_request, id) OFF(P##_request, sector_number)                \
    OFF(P##_request, seg)                                               \
    SIZE(P##_request_discard) OFF(P##_request_discard, operation)       \
    OFF(P##_request_discard, flag) OFF(P##_request_discard, handle)     \
    OFF(P##_request_discard, id)                                        \
    OFF(P##_request_discard, sector_number)                             \
    OFF(P##_request_discard, nr_sectors)                                \
    SIZE(P##_request_indirect) OFF(P##_request_indirect, operation)     \
    OFF(P##_request_indirect, indirect_op)                              \
    OFF(P##_request_indirect, nr_segments)                              \
    OFF(P##_request_indirect, id)                                       \
    OFF(P##_request_indirect, sector_number)                            \
    OFF(P##_request_indirect, handle)                                   \
    OFF(P##_request_indirect, indirect_grefs)                           \
    SIZE(P##_response) OFF(P##_response, id)                            \
    OFF(P##_response, operation) OFF(P##_response, status)              \
    V(P##_sring_entry__sizeof, sizeof(union P##_sring_entry))           \
    V(P##_ring_size_order0, __CONST_RING_SIZE(P, 4096 << 0))            \
    V(P##_ring_size_order1, __CONST_RING_SIZE(P, 4096 << 1))            \
    V(P##_ring_size_order2, __CONST_RING_SIZE(P, 4096 << 2))            \
    V(P##_ring_size_order3, __CONST_RING_SIZE(P, 4096 << 3))            \
    V(P##_ring_size_order4, __CONST_RING_SIZE(P, 4096 << 4))

BLKIF_STRUCTS(blkif)
#ifdef PROBE_I386
OFF(blkif_request_indirect, pad)
#endif
OFF(blkif_sring, req_prod) OFF(blkif_sring, req_event)
OFF(blkif_sring, rsp_prod) OFF(blkif_sring, rsp_event)
OFF(blkif_sring, pvt) OFF(blkif_sring, __pad)
V(blkif_sring__sizeof, offsetof(struct blkif_sring, ring))
SIZE(blkif_request_segment) OFF(blkif_request_segment, gref)
OFF(blkif_request_segment, first_sect) OFF(blkif_request_segment, last_sect)

K(BLKIF_OP_READ)
K(BLKIF_OP_WRITE)
K(BLKIF_OP_WRITE_BARRIER)
K(BLKIF_OP_FLUSH_DISKCACHE)
K(BLKIF_OP_RESERVED_1)
K(BLKIF_OP_DISCARD)
K(BLKIF_OP_INDIRECT)
K(BLKIF_MAX_SEGMENTS_PER_REQUEST)
K(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
K(BLKIF_DISCARD_SECURE)
K(BLKIF_RSP_OKAY)
K(BLKIF_RSP_ERROR)
K(BLKIF_RSP_EOPNOTSUPP)
K(VDISK_CDROM)
K(VDISK_REMOVABLE)
K(VDISK_READONLY)
const char probe_XEN_IO_PROTO_ABI_NATIVE_[] = XEN_IO_PROTO_ABI_NATIVE;
const char probe_XEN_IO_PROTO_ABI_X86_32_[] = XEN_IO_PROTO_ABI_X86_32;
const char probe_XEN_IO_PROTO_ABI_X86_64_[] = XEN_IO_PROTO_ABI_X86_64;

#ifndef PROBE_I386
#include <sys/ioctl.h>
#include <xen/io/xenbus.h>
#include <xen/io/xs_wire.h>
#include <xen/sys/evtchn.h>
#include <xen/sys/gntdev.h>
#include "blkif_x86_32.h"

/* The test frontend's own declaration of the 32-bit ABI. */
BLKIF_STRUCTS(blkif_x86_32)

K(XenbusStateUnknown)
K(XenbusStateInitialising)
K(XenbusStateInitWait)
K(XenbusStateInitialised)
K(XenbusStateConnected)
K(XenbusStateClosing)
K(XenbusStateClosed)
K(XenbusStateReconfiguring)
K(XenbusStateReconfigured)

K(GNTCOPY_source_gref)
K(GNTCOPY_dest_gref)
K(GNTST_okay)
K(GNTST_bad_gntref)
K(GNTST_permission_denied)

K(IOCTL_GNTDEV_MAP_GRANT_REF)
K(IOCTL_GNTDEV_UNMAP_GRANT_REF)
K(IOCTL_GNTDEV_GRANT_COPY)
K(IOCTL_EVTCHN_BIND_INTERDOMAIN)
K(IOCTL_EVTCHN_UNBIND)
K(IOCTL_EVTCHN_NOTIFY)

SIZE(ioctl_gntdev_grant_ref) OFF(ioctl_gntdev_grant_ref, domid)
OFF(ioctl_gntdev_grant_ref, ref)
OFF(ioctl_gntdev_map_grant_ref, count) OFF(ioctl_gntdev_map_grant_ref, index)
/* the fixed part, followed by refs[count] */
V(ioctl_gntdev_map_grant_ref__sizeof,
  offsetof(struct ioctl_gntdev_map_grant_ref, refs))
SIZE(ioctl_gntdev_unmap_grant_ref) OFF(ioctl_gntdev_unmap_grant_ref, index)
OFF(ioctl_gntdev_unmap_grant_ref, count)
SIZE(ioctl_gntdev_grant_copy) OFF(ioctl_gntdev_grant_copy, count)
OFF(ioctl_gntdev_grant_copy, segments)
SIZE(ioctl_gntdev_grant_copy_segment)
OFF(ioctl_gntdev_grant_copy_segment, source)
OFF(ioctl_gntdev_grant_copy_segment, dest)
OFF(ioctl_gntdev_grant_copy_segment, len)
OFF(ioctl_gntdev_grant_copy_segment, flags)
OFF(ioctl_gntdev_grant_copy_segment, status)
V(gntdev_copy_foreign__sizeof,
  sizeof(((struct ioctl_gntdev_grant_copy_segment *)0)->source.foreign))
V(gntdev_copy_foreign__ref, offsetof(struct ioctl_gntdev_grant_copy_segment,
                                     source.foreign.ref))
V(gntdev_copy_foreign__offset,
  offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.offset))
V(gntdev_copy_foreign__domid,
  offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.domid))
SIZE(ioctl_evtchn_bind_interdomain)
OFF(ioctl_evtchn_bind_interdomain, remote_domain)
OFF(ioctl_evtchn_bind_interdomain, remote_port)
SIZE(ioctl_evtchn_notify) OFF(ioctl_evtchn_notify, port)
SIZE(ioctl_evtchn_unbind) OFF(ioctl_evtchn_unbind, port)

SIZE(xsd_sockmsg) OFF(xsd_sockmsg, type) OFF(xsd_sockmsg, req_id)
OFF(xsd_sockmsg, tx_id) OFF(xsd_sockmsg, len)
K(XENSTORE_PAYLOAD_MAX)
K(XENSTORE_ABS_PATH_MAX)
K(XENSTORE_REL_PATH_MAX)
K(XS_CONTROL)
K(XS_DIRECTORY)
K(XS_READ)
K(XS_GET_PERMS)
K(XS_WATCH)
K(XS_UNWATCH)
K(XS_TRANSACTION_START)
K(XS_TRANSACTION_END)
K(XS_INTRODUCE)
K(XS_RELEASE)
K(XS_GET_DOMAIN_PATH)
K(XS_WRITE)
K(XS_MKDIR)
K(XS_RM)
K(XS_SET_PERMS)
K(XS_WATCH_EVENT)
K(XS_ERROR)
K(XS_IS_DOMAIN_INTRODUCED)
K(XS_RESUME)
K(XS_SET_TARGET)
K(XS_RESET_WATCHES)
K(XS_DIRECTORY_PART)
K(XS_TYPE_COUNT)
#endif
