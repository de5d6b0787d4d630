/*
 * xtool: the Xen lane's disk tool, built static so that the same binary
 * runs in the domU's initramfs (on /dev/xvdX) and in dom0 (on raw images).
 *
 *   xtool apply DEV SEED        the pattern plan: O_DIRECT|O_SYNC writes at
 *                               several offsets, then one BLKDISCARD
 *   xtool verify ORIG NEW SEED  NEW is ORIG with the plan applied: written
 *                               ranges hold the pattern, the discarded one
 *                               zeros or ORIG's bytes, the rest ORIG's
 *   xtool stream DEV SEED       write 64 KiB blocks round the disk for
 *                               ever, fdatasync after every 8 and print
 *                               "FLUSHED n" (writes 0..n-1 are durable)
 *   xtool streamed IMG SEED N   IMG holds every one of the first N writes
 *                               (or a later one in its block)
 *   xtool readonly DEV          a read-only disk refuses writes, the
 *                               guest's and (after BLKROSET 0) the
 *                               backend
 *   xtool bench DEV MODE BS QD SECONDS
 *                               O_DIRECT I/O through Linux AIO, QD in
 *                               flight: MODE read|write (sequential) or
 *                               randread|randwrite; prints one BENCH line
 *
 * Pattern: every 512-byte sector of a write is 32 copies of the 16-byte
 * record (seed, byte offset of the sector), so a misplaced sector names
 * where it belongs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SECTOR 512
#define MiB (1024 * 1024)
#define STREAM_BLOCK (64 * 1024)
#define STREAM_SYNC_EVERY 8

/* The plan (offsets from the start; negative: from the end).  Chosen to
 * cross what the formats divide at: the first sector, a lone unaligned
 * sector run, a 64 KiB cluster boundary, a request bigger than one ring
 * request's 11 segments (indirect), and the last sectors of the disk. */
static const struct { int64_t offset; int64_t length; } writes[] = {
    {0, 4096},
    {1 * MiB + 512, 1536},
    {3 * MiB - 4096, 8192},
    {5 * MiB, 300 * 1024},
    {-8192, 8192},
};
static const int64_t discard_offset = 8 * MiB, discard_length = 2 * MiB;

static void die(const char *what)
{
    fprintf(stderr, "xtool: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fill(unsigned char *buf, int64_t length, uint64_t seed,
                 int64_t offset)
{
    for (int64_t s = 0; s < length; s += SECTOR)
        for (int i = 0; i < SECTOR; i += 16) {
            uint64_t rec[2] = {seed, (uint64_t)(offset + s)};
            memcpy(buf + s + i, rec, 16);
        }
}

static void *aligned(size_t n)
{
    void *p;
    if (posix_memalign(&p, 4096, n))
        die("posix_memalign");
    return p;
}

static int64_t size_of(int fd)
{
    struct stat st;
    uint64_t bytes;
    if (fstat(fd, &st) < 0)
        die("fstat");
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &bytes) < 0)
            die("BLKGETSIZE64");
        return (int64_t)bytes;
    }
    return st.st_size;
}

static int64_t at(int64_t offset, int64_t size)
{
    return offset < 0 ? size + offset : offset;
}

static int apply(const char *dev, uint64_t seed)
{
    int fd = open(dev, O_RDWR | O_DIRECT | O_SYNC);
    if (fd < 0)
        die(dev);
    int64_t size = size_of(fd);
    for (size_t i = 0; i < sizeof writes / sizeof *writes; i++) {
        int64_t off = at(writes[i].offset, size), len = writes[i].length;
        unsigned char *buf = aligned(len);
        fill(buf, len, seed, off);
        if (pwrite(fd, buf, len, off) != len)
            die("pwrite");
        free(buf);
    }
    /* A backend that cannot discard does not offer it (EOPNOTSUPP). */
    uint64_t range[2] = {discard_offset, discard_length};
    int discarded = ioctl(fd, BLKDISCARD, range) == 0;
    if (!discarded && errno != EOPNOTSUPP)
        die("BLKDISCARD");
    if (fsync(fd) < 0)
        die("fsync");
    close(fd);
    printf("%zu O_DIRECT|O_SYNC writes, ", sizeof writes / sizeof *writes);
    if (discarded)
        printf("a discard of %lld bytes at %lld\n", (long long)discard_length,
               (long long)discard_offset);
    else
        printf("discard not offered by the backend\n");
    return 0;
}

/* What byte range [off, off+len) of the plan covers, per sector:
 * 'w' written, 'd' discarded, 0 untouched. */
static char kind(int64_t off, int64_t size)
{
    for (size_t i = 0; i < sizeof writes / sizeof *writes; i++) {
        int64_t w = at(writes[i].offset, size);
        if (off >= w && off < w + writes[i].length)
            return 'w';
    }
    if (off >= discard_offset && off < discard_offset + discard_length)
        return 'd';
    return 0;
}

static int verify(const char *orig, const char *new, uint64_t seed)
{
    FILE *a = fopen(orig, "rb"), *b = fopen(new, "rb");
    if (!a || !b)
        die("open");
    int64_t size = size_of(fileno(a));
    if (size_of(fileno(b)) != size) {
        printf("sizes differ: %lld and %lld\n", (long long)size,
               (long long)size_of(fileno(b)));
        return 1;
    }
    unsigned char x[SECTOR], y[SECTOR], p[SECTOR], zero[SECTOR] = {0};
    long counts[3] = {0};
    for (int64_t off = 0; off < size; off += SECTOR) {
        if (fread(x, 1, SECTOR, a) != SECTOR ||
            fread(y, 1, SECTOR, b) != SECTOR)
            die("short read");
        char k = kind(off, size);
        int ok;
        if (k == 'w') {
            fill(p, SECTOR, seed, off);
            ok = !memcmp(y, p, SECTOR);
        } else if (k == 'd') {
            ok = !memcmp(y, zero, SECTOR) || !memcmp(y, x, SECTOR);
            counts[2] += !memcmp(y, zero, SECTOR) && memcmp(x, zero, SECTOR);
        } else {
            ok = !memcmp(y, x, SECTOR);
        }
        counts[k == 'w'] += 1;
        if (!ok) {
            printf("sector at %lld (%s) holds the wrong bytes\n",
                   (long long)off, k == 'w' ? "written" :
                   k == 'd' ? "discarded" : "untouched");
            return 1;
        }
    }
    printf("%ld sectors written, %ld untouched, %ld discarded sectors "
           "read as zeros\n", counts[1], counts[0], counts[2]);
    return 0;
}

/* Write n goes to block n % blocks, its records naming n, so that what a
 * block holds says which write put it there. */
static void __attribute__((noreturn)) stream(const char *dev, uint64_t seed)
{
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0)
        die(dev);
    int64_t blocks = size_of(fd) / STREAM_BLOCK;
    unsigned char *buf = aligned(STREAM_BLOCK);
    for (int64_t n = 0;; n++) {
        fill(buf, STREAM_BLOCK, seed, n * STREAM_BLOCK);
        off_t at = n % blocks * STREAM_BLOCK;
        if (pwrite(fd, buf, STREAM_BLOCK, at) != STREAM_BLOCK)
            die("pwrite");
        if ((n + 1) % STREAM_SYNC_EVERY == 0) {
            if (fdatasync(fd) < 0)
                die("fdatasync");
            printf("FLUSHED %lld\n", (long long)n + 1);
        }
    }
}

/* After writes 0..n-1 were flushed, each block holds the last of them
 * that went to it, or a later write (unflushed writes may have landed). */
static int streamed(const char *img, uint64_t seed, int64_t n)
{
    int fd = open(img, O_RDONLY);
    if (fd < 0)
        die(img);
    int64_t blocks = size_of(fd) / STREAM_BLOCK;
    unsigned char *buf = malloc(STREAM_BLOCK), *want = malloc(STREAM_BLOCK);
    for (int64_t i = 0; i < blocks && i < n; i++) {
        int64_t last = i + (n - 1 - i) / blocks * blocks;   /* flushed */
        uint64_t rec[2];
        if (pread(fd, buf, STREAM_BLOCK, i * STREAM_BLOCK) != STREAM_BLOCK)
            die("pread");
        memcpy(rec, buf, 16);
        int64_t w = (int64_t)(rec[1] / STREAM_BLOCK);
        if (rec[0] == seed && w >= last && w % blocks == i) {
            fill(want, STREAM_BLOCK, seed, w * STREAM_BLOCK);
            if (!memcmp(buf, want, STREAM_BLOCK))
                continue;
        }
        printf("block %lld lost flushed write %lld\n", (long long)i,
               (long long)last);
        return 1;
    }
    printf("every one of %lld flushed writes is on the disk\n", (long long)n);
    return 0;
}

/* Linux 6.1 lets a read-only block device be opened for writing and
 * refuses the write itself; BLKROSET 0 then sends one to the backend. */
static int readonly(const char *dev)
{
    unsigned char *buf = aligned(4096);
    memset(buf, 0xa5, 4096);
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd >= 0 && pwrite(fd, buf, 4096, 0) == 4096) {
        printf("the guest wrote to a read-only disk\n");
        return 1;
    }
    printf("guest write: %s; ", strerror(errno));
    if (fd >= 0)
        close(fd);
    int off = 0;
    fd = open(dev, O_RDONLY);
    if (fd < 0 || ioctl(fd, BLKROSET, &off) < 0)
        die("BLKROSET");
    close(fd);
    fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0)
        die("open after BLKROSET");
    if (pwrite(fd, buf, 4096, 0) == 4096 && fsync(fd) == 0) {
        printf("the backend took a write\n");
        return 1;
    }
    printf("write sent to the backend: %s\n", strerror(errno));
    return 0;
}

/* --- bench: Linux AIO by raw system calls (no libaio in a static build) */

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static int bench(const char *dev, const char *mode, long bs, int qd,
                 double seconds)
{
    int write = !strcmp(mode, "write") || !strcmp(mode, "randwrite");
    int random = !strncmp(mode, "rand", 4);
    int fd = open(dev, (write ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        die(dev);
    int64_t blocks = size_of(fd) / bs, next = 0;
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, qd, &ctx) < 0)
        die("io_setup");
    struct iocb *cbs = calloc(qd, sizeof *cbs);
    struct iocb **list = calloc(qd, sizeof *list);
    struct io_event *events = calloc(qd, sizeof *events);
    unsigned char *bufs = aligned((size_t)bs * qd);
    memset(bufs, 0x5a, (size_t)bs * qd);
    uint64_t rnd = 0x9e3779b97f4a7c15ULL;
    long ops = 0, start = now_ns(), stop = start + (long)(seconds * 1e9);
    int inflight = 0, submitting = 1;

    for (;;) {
        int n = 0;
        for (int i = 0; submitting && i < qd; i++) {
            if (cbs[i].aio_data)        /* in flight */
                continue;
            int64_t block;
            if (random) {
                rnd ^= rnd << 13; rnd ^= rnd >> 7; rnd ^= rnd << 17;
                block = rnd % blocks;
            } else {
                block = next++ % blocks;
            }
            memset(&cbs[i], 0, sizeof cbs[i]);
            cbs[i].aio_data = i + 1;
            cbs[i].aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
            cbs[i].aio_fildes = fd;
            cbs[i].aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)i * bs);
            cbs[i].aio_nbytes = bs;
            cbs[i].aio_offset = block * bs;
            list[n++] = &cbs[i];
        }
        if (n && syscall(SYS_io_submit, ctx, n, list) != n)
            die("io_submit");
        inflight += n;
        if (!inflight)
            break;
        long got = syscall(SYS_io_getevents, ctx, 1, qd, events, NULL);
        if (got < 0)
            die("io_getevents");
        for (long e = 0; e < got; e++) {
            if (events[e].res != bs) {
                errno = events[e].res < 0 ? -events[e].res : EIO;
                die("aio");
            }
            cbs[events[e].data - 1].aio_data = 0;
            ops++;
        }
        inflight -= got;
        if (now_ns() >= stop)
            submitting = 0;
    }
    double secs = (now_ns() - start) / 1e9;
    printf("BENCH %s %ld %d ops %ld secs %.3f iops %.0f mibs %.1f\n", mode,
           bs, qd, ops, secs, ops / secs, ops * (double)bs / secs / MiB);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4 && !strcmp(argv[1], "apply"))
        return apply(argv[2], strtoull(argv[3], NULL, 0));
    if (argc == 5 && !strcmp(argv[1], "verify"))
        return verify(argv[2], argv[3], strtoull(argv[4], NULL, 0));
    if (argc == 4 && !strcmp(argv[1], "stream"))
        stream(argv[2], strtoull(argv[3], NULL, 0));
    if (argc == 5 && !strcmp(argv[1], "streamed"))
        return streamed(argv[2], strtoull(argv[3], NULL, 0),
                        strtoll(argv[4], NULL, 0));
    if (argc == 3 && !strcmp(argv[1], "readonly"))
        return readonly(argv[2]);
    if (argc == 7 && !strcmp(argv[1], "bench"))
        return bench(argv[2], argv[3], strtol(argv[4], NULL, 0),
                     atoi(argv[5]), atof(argv[6]));
    fprintf(stderr, "usage: xtool apply|verify|stream|streamed|readonly|"
            "bench ...\n");
    return 2;
}
