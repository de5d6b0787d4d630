/*
 * Frontend ring operations for one blkif ABI, written only with Xen's
 * ring.h macros.  frontend.c includes this once per ABI with
 * ABI (the DEFINE_RING_TYPES name) and F(name) (the function prefix).
 */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define T(suffix) CAT(ABI, suffix)

static T(_front_ring_t) F(ring);

static void F(attach)(void *mem, size_t bytes, RING_IDX start)
{
    T(_sring_t) *s = mem;

    SHARED_RING_INIT(s);
    /* A frontend may run its free-running indices from anywhere. */
    s->req_prod = s->rsp_prod = start;
    s->req_event = s->rsp_event = start + 1;
    FRONT_RING_ATTACH(&F(ring), s, start, bytes);
}

static void F(put_rw)(int op, uint64_t id, uint64_t sector, int nseg,
                      const struct seg *segs, int n)
{
    struct T(_request) r;
    int i;

    memset(&r, 0, sizeof(r));
    r.operation = op;
    r.nr_segments = nseg;
    r.id = id;
    r.sector_number = sector;
    for (i = 0; i < n && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
        r.seg[i].gref = segs[i].gref;
        r.seg[i].first_sect = segs[i].first;
        r.seg[i].last_sect = segs[i].last;
    }
    *RING_GET_REQUEST(&F(ring), F(ring).req_prod_pvt) = r;
    F(ring).req_prod_pvt++;
}

static void F(put_discard)(uint64_t id, uint64_t sector, uint64_t nr,
                           int flag)
{
    struct T(_request_discard) d;

    memset(&d, 0, sizeof(d));
    d.operation = BLKIF_OP_DISCARD;
    d.flag = flag;
    d.id = id;
    d.sector_number = sector;
    d.nr_sectors = nr;
    memcpy(RING_GET_REQUEST(&F(ring), F(ring).req_prod_pvt), &d, sizeof(d));
    F(ring).req_prod_pvt++;
}

static void F(put_indirect)(int iop, uint64_t id, uint64_t sector, int nseg,
                            const uint32_t *grefs, int n)
{
    struct T(_request_indirect) r;
    int i;

    memset(&r, 0, sizeof(r));
    r.operation = BLKIF_OP_INDIRECT;
    r.indirect_op = iop;
    r.nr_segments = nseg;
    r.id = id;
    r.sector_number = sector;
    for (i = 0; i < n && i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
        r.indirect_grefs[i] = grefs[i];
    memcpy(RING_GET_REQUEST(&F(ring), F(ring).req_prod_pvt), &r, sizeof(r));
    F(ring).req_prod_pvt++;
}

static int F(push)(void)
{
    int notify;

    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&F(ring), notify);
    return notify;
}

/* Take one response if one is published: 1, 0, or -1 for a backend that
 * published more responses than requests (RING_RESPONSE_PROD_OVERFLOW). */
static int F(take)(struct rsp *out)
{
    RING_IDX rp = F(ring).sring->rsp_prod;
    struct T(_response) r;

    rmb();  /* read responses only after rsp_prod */
    if (RING_RESPONSE_PROD_OVERFLOW(&F(ring), rp))
        return -1;
    if (F(ring).rsp_cons == rp)
        return 0;
    RING_COPY_RESPONSE(&F(ring), F(ring).rsp_cons, &r);
    F(ring).rsp_cons++;
    out->id = r.id;
    out->op = r.operation;
    out->status = r.status;
    return 1;
}

static int F(final)(void)
{
    int more;

    RING_FINAL_CHECK_FOR_RESPONSES(&F(ring), more);
    return more;
}

static unsigned F(free_requests)(void)
{
    return RING_FREE_REQUESTS(&F(ring));
}

static void F(state)(RING_IDX *v)
{
    v[0] = F(ring).sring->req_prod;
    v[1] = F(ring).sring->req_event;
    v[2] = F(ring).sring->rsp_prod;
    v[3] = F(ring).sring->rsp_event;
    v[4] = F(ring).req_prod_pvt;
    v[5] = F(ring).rsp_cons;
    v[6] = RING_SIZE(&F(ring));
}

/* After the backend died: withdraw the requests it never answered, so a
 * new backend (which starts at rsp_prod) finds the ring idle. */
static void F(recover)(void)
{
    F(ring).req_prod_pvt = F(ring).rsp_cons;
    wmb();
    F(ring).sring->req_prod = F(ring).rsp_cons;
}

static void F(poke)(int field, RING_IDX value)
{
    RING_IDX *h = (RING_IDX *)F(ring).sring;

    h[field] = value;
    mb();
}

static const struct ops F(ops) = {
    F(attach), F(put_rw), F(put_discard), F(put_indirect), F(push),
    F(take), F(final), F(free_requests), F(state), F(recover), F(poke),
};

#undef T
