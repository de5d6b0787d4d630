/*
 * The x86_32 blkif ABI as a 64-bit program sees it: the installed
 * xen/io/blkif.h only describes the native layout, so a backend or test
 * frontend declares the 32-bit one itself.  On i386 uint64_t is 4-byte
 * aligned, hence pack(4); the indirect request carries the explicit pad
 * that blkif.h adds under __i386__.  The probe test checks every offset
 * here against blkif.h compiled with gcc -m32.
 */
#ifndef TAPBRIDGE_TEST_BLKIF_X86_32_H
#define TAPBRIDGE_TEST_BLKIF_X86_32_H

#include <xen/io/blkif.h>

#pragma pack(push, 4)
struct blkif_x86_32_request {
    uint8_t        operation;
    uint8_t        nr_segments;
    blkif_vdev_t   handle;
    uint64_t       id;
    blkif_sector_t sector_number;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct blkif_x86_32_request_discard {
    uint8_t        operation;
    uint8_t        flag;
    blkif_vdev_t   handle;
    uint64_t       id;
    blkif_sector_t sector_number;
    uint64_t       nr_sectors;
};
struct blkif_x86_32_request_indirect {
    uint8_t        operation;
    uint8_t        indirect_op;
    uint16_t       nr_segments;
    uint64_t       id;
    blkif_sector_t sector_number;
    blkif_vdev_t   handle;
    grant_ref_t    indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint64_t       pad;
};
struct blkif_x86_32_response {
    uint64_t       id;
    uint8_t        operation;
    int16_t        status;
};
#pragma pack(pop)

DEFINE_RING_TYPES(blkif_x86_32, struct blkif_x86_32_request,
                  struct blkif_x86_32_response);

#endif
