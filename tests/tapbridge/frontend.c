/*
 * A blkif frontend for tests, built from Xen's installed ring.h macros,
 * driving a backend over tapbridge's shared-memory contract:
 *
 *     frontend DIR ORDER x86_64|x86_32 [START]
 *
 * DIR/ring (4096 << ORDER bytes) is initialised here (SHARED_RING_INIT,
 * indices starting at START); DIR/grants is guest memory (grant g is page
 * g); DIR/kick-backend and DIR/kick-frontend carry one byte per
 * notification.  Commands, one per line on stdin:
 *
 *   req OP ID SECTOR NSEG [GREF:FIRST:LAST ...]  queue a request
 *   discard ID SECTOR NR FLAG                    queue a discard
 *   indirect IOP ID SECTOR NSEG GREF...          queue an indirect request
 *   push        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY -> "notify N"
 *   kick        notify the backend unconditionally
 *   get N MS    take N responses as a frontend's interrupt handler does
 *               (take, final check, sleep on the kick FIFO); prints
 *               "rsp ID OP STATUS" lines then "got N" or "timeout N"
 *   poll        print the responses published so far, then "got N"
 *   final       RING_FINAL_CHECK_FOR_RESPONSES -> "more N"
 *   free        RING_FREE_REQUESTS -> "free N"
 *   state       "state req_prod req_event rsp_prod rsp_event
 *                req_prod_pvt rsp_cons size kicks"
 *   poke FIELD VALUE   store a header word (0 req_prod .. 3 rsp_event)
 *   recover     take published responses, then withdraw unanswered
 *               requests (after the backend died) -> "recovered N"
 *   bench randread|randwrite BS QD SECONDS DISK_BYTES
 *               keep QD requests of BS bytes in flight -> "bench OPS
 *               ERRORS NSEC"; slot k uses pages [k*P, (k+1)*P) and, for
 *               indirect requests, page QD*P + k
 *   quit
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ring.h wants these (or xen_mb and friends) from its includer. */
#define mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

#include <xen/io/blkif.h>
#include "blkif_x86_32.h"

#define PAGE 4096

struct seg { uint32_t gref; int first, last; };
struct rsp { uint64_t id; int op, status; };

struct ops {
    void (*attach)(void *, size_t, RING_IDX);
    void (*put_rw)(int, uint64_t, uint64_t, int, const struct seg *, int);
    void (*put_discard)(uint64_t, uint64_t, uint64_t, int);
    void (*put_indirect)(int, uint64_t, uint64_t, int, const uint32_t *,
                         int);
    int (*push)(void);
    int (*take)(struct rsp *);
    int (*final)(void);
    unsigned (*free_requests)(void);
    void (*state)(RING_IDX *);
    void (*recover)(void);
    void (*poke)(int, RING_IDX);
};

#define ABI blkif
#define F(name) native_##name
#include "front_ops.h"
#undef ABI
#undef F
#define ABI blkif_x86_32
#define F(name) x86_32_##name
#include "front_ops.h"
#undef ABI
#undef F

static const struct ops *ops;
static int kick_out, kick_in;
static unsigned long kicks;
static uint8_t *grants;
static size_t grants_len;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void *map_file(const char *dir, const char *name, size_t *len,
                      size_t want)
{
    char path[4096];
    struct stat st;
    void *p;
    int fd;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    fd = open(path, O_RDWR | O_CREAT, 0600);
    if (fd < 0)
        die(path);
    if (want && ftruncate(fd, want) < 0)
        die("ftruncate");
    if (fstat(fd, &st) < 0)
        die("fstat");
    *len = st.st_size;
    if (!*len)
        return NULL;
    p = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    close(fd);
    return p;
}

static int open_fifo(const char *dir, const char *name)
{
    char path[4096];
    int fd;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if (mkfifo(path, 0600) < 0 && errno != EEXIST)
        die(path);
    fd = open(path, O_RDWR | O_NONBLOCK);
    if (fd < 0)
        die(path);
    return fd;
}

static void notify_backend(void)
{
    if (write(kick_out, "", 1) < 0 && errno != EAGAIN)
        die("write kick-backend");
}

static void drain_kicks(void)
{
    char buf[256];
    ssize_t n;

    while ((n = read(kick_in, buf, sizeof(buf))) > 0)
        kicks += n;
}

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Wait for the backend's notification, at most ms milliseconds. */
static void sleep_on_kick(int ms)
{
    struct pollfd p = { .fd = kick_in, .events = POLLIN };

    if (poll(&p, 1, ms) > 0)
        drain_kicks();
}

static int take_checked(struct rsp *r)
{
    int got = ops->take(r);

    if (got < 0) {
        printf("bogus backend: response producer overran\n");
        fflush(stdout);
        exit(3);
    }
    return got;
}

/* Print every response published so far, without touching rsp_event. */
static int take_all(void)
{
    struct rsp r;
    int got = 0;

    while (take_checked(&r)) {
        got++;
        printf("rsp 0x%" PRIx64 " %d %d\n", r.id, r.op, r.status);
    }
    return got;
}

/* Take n responses like an interrupt handler: consume, final check,
 * sleep until notified.  A backend that forgets to notify times out. */
static void get(int n, int ms)
{
    int64_t deadline = now_ns() + (int64_t)ms * 1000000;
    struct rsp r;
    int got = 0;

    while (got < n) {
        while (got < n && take_checked(&r)) {
            got++;
            printf("rsp 0x%" PRIx64 " %d %d\n", r.id, r.op, r.status);
        }
        if (got >= n || ops->final())
            continue;
        int64_t left = (deadline - now_ns()) / 1000000;
        if (left <= 0)
            break;
        sleep_on_kick(left);
    }
    printf("%s %d\n", got < n ? "timeout" : "got", got);
}

static uint64_t rng_state = 88172645463325252ULL;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void bench(const char *mode, long bs, int qd, double seconds,
                  uint64_t disk_bytes)
{
    int write = strcmp(mode, "randwrite") == 0;
    int pages = bs / PAGE;
    int indirect = pages > BLKIF_MAX_SEGMENTS_PER_REQUEST;
    uint64_t blocks = disk_bytes / bs, ops_done = 0, errors = 0;
    int64_t start, end;
    struct seg segs[BLKIF_MAX_SEGMENTS_PER_REQUEST];
    struct rsp r;
    int k, i, outstanding = 0;

    if (bs % PAGE || pages < 1 || pages > 512 ||
        (size_t)qd * (pages + 1) * PAGE > grants_len) {
        printf("bench: bad arguments or grants too small\n");
        return;
    }
    for (k = 0; indirect && k < qd; k++) {
        struct blkif_request_segment *list =
            (void *)(grants + (size_t)(qd * pages + k) * PAGE);
        for (i = 0; i < pages; i++) {
            list[i].gref = k * pages + i;
            list[i].first_sect = 0;
            list[i].last_sect = 7;
        }
    }
#define SUBMIT(k) do {                                                  \
        uint64_t sector = rnd() % blocks * (bs / 512);                  \
        int op = write ? BLKIF_OP_WRITE : BLKIF_OP_READ;                \
        if (indirect) {                                                 \
            uint32_t g = qd * pages + (k);                              \
            ops->put_indirect(op, (k), sector, pages, &g, 1);           \
        } else {                                                        \
            for (i = 0; i < pages; i++) {                               \
                segs[i].gref = (k) * pages + i;                         \
                segs[i].first = 0;                                      \
                segs[i].last = 7;                                       \
            }                                                           \
            ops->put_rw(op, (k), sector, pages, segs, pages);           \
        }                                                               \
        outstanding++;                                                  \
    } while (0)
    start = now_ns();
    end = start + (int64_t)(seconds * 1e9);
    for (k = 0; k < qd; k++)
        SUBMIT(k);
    if (ops->push())
        notify_backend();
    while (outstanding) {
        int took = 0, again = now_ns() < end;
        while (take_checked(&r)) {
            took++;
            outstanding--;
            ops_done++;
            if (r.status)
                errors++;
            if (again)
                SUBMIT((int)r.id);
        }
        if (took) {
            if (ops->push())
                notify_backend();
            continue;
        }
        if (!ops->final())
            sleep_on_kick(1000);
    }
#undef SUBMIT
    printf("bench %" PRIu64 " %" PRIu64 " %" PRId64 "\n", ops_done, errors,
           now_ns() - start);
}

int main(int argc, char **argv)
{
    char line[65536];
    size_t ring_len;
    void *ring;

    if (argc < 4) {
        fprintf(stderr, "usage: frontend DIR ORDER x86_64|x86_32 [START]\n");
        return 2;
    }
    ops = strcmp(argv[3], "x86_32") == 0 ? &x86_32_ops : &native_ops;
    ring = map_file(argv[1], "ring", &ring_len,
                    (size_t)PAGE << atoi(argv[2]));
    grants = map_file(argv[1], "grants", &grants_len, 0);
    kick_out = open_fifo(argv[1], "kick-backend");
    kick_in = open_fifo(argv[1], "kick-frontend");
    ops->attach(ring, ring_len,
                argc > 4 ? (RING_IDX)strtoul(argv[4], NULL, 0) : 0);
    printf("ready\n");
    fflush(stdout);

    while (fgets(line, sizeof(line), stdin)) {
        char *save, *cmd = strtok_r(line, " \n", &save);
        char *arg[600];
        int n = 0;

        if (!cmd)
            continue;
        while (n < 600 && (arg[n] = strtok_r(NULL, " \n", &save)))
            n++;
#define U(i) strtoull(arg[i], NULL, 0)
        if (!strcmp(cmd, "req")) {
            struct seg segs[BLKIF_MAX_SEGMENTS_PER_REQUEST];
            int i, nseg = 0;
            for (i = 4; i < n && nseg < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
                unsigned g, f, l;
                sscanf(arg[i], "%u:%u:%u", &g, &f, &l);
                segs[nseg++] = (struct seg){ g, f, l };
            }
            ops->put_rw(U(0), U(1), U(2), U(3), segs, nseg);
        } else if (!strcmp(cmd, "discard")) {
            ops->put_discard(U(0), U(1), U(2), U(3));
        } else if (!strcmp(cmd, "indirect")) {
            uint32_t g[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
            int i;
            for (i = 4; i < n && i - 4 < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;
                 i++)
                g[i - 4] = U(i);
            ops->put_indirect(U(0), U(1), U(2), U(3), g, i - 4);
        } else if (!strcmp(cmd, "push")) {
            int notify = ops->push();
            if (notify)
                notify_backend();
            printf("notify %d\n", notify);
        } else if (!strcmp(cmd, "kick")) {
            notify_backend();
        } else if (!strcmp(cmd, "get")) {
            get(U(0), U(1));
        } else if (!strcmp(cmd, "poll")) {
            printf("got %d\n", take_all());
        } else if (!strcmp(cmd, "final")) {
            printf("more %d\n", ops->final());
        } else if (!strcmp(cmd, "free")) {
            printf("free %u\n", ops->free_requests());
        } else if (!strcmp(cmd, "state")) {
            RING_IDX v[7];
            drain_kicks();
            ops->state(v);
            printf("state %u %u %u %u %u %u %u %lu\n", v[0], v[1], v[2],
                   v[3], v[4], v[5], v[6], kicks);
        } else if (!strcmp(cmd, "poke")) {
            ops->poke(U(0), U(1));
        } else if (!strcmp(cmd, "recover")) {
            RING_IDX v[7];
            take_all();
            ops->state(v);
            ops->recover();
            printf("recovered %u\n", v[4] - v[5]);
        } else if (!strcmp(cmd, "bench")) {
            bench(arg[0], U(1), U(2), strtod(arg[3], NULL), U(4));
        } else if (!strcmp(cmd, "quit")) {
            break;
        } else {
            printf("error unknown command %s\n", cmd);
        }
#undef U
        fflush(stdout);
    }
    return 0;
}
