/* dp_ring.h: SPSC descriptor ring operations.
 *
 * Producer (worker): dp_ring_reserve() how many it may write, fill desc[], dp_ring_submit().
 * Consumer: dp_ring_peek() a contiguous batch (this takes it: the next peek starts after it),
 * read it, dp_ring_release() to give its slots back.  A consumer may hold several peeked batches
 * before it releases the oldest (the TCP sender keeps batches in flight until acknowledged), and
 * dp_ring_cancel() hands back the tail of a peek it did not use.  As xdp-tools' xsk ring: each
 * side caches the other's index and reads the shared one only when the cache runs out.
 *
 * The other side's index is never trusted (it is another process's shared memory): each read is
 * checked against what this side knows.  A producer's cons only moves forward and never passes
 * prod; a consumer's prod only moves forward and never gets more than size ahead of cons.  So
 * prod - cons <= size always holds for the cached values.  An impossible value is not taken:
 * the side records it (fault, bad), reserve/peek return 0 from then on, and the caller stops
 * with dp_ring_why()'s message (core/common.c) instead of freeing, returning or reading
 * positions on the word of a corrupted or foreign writer.  size is copied at init, for the same
 * reason.
 */
#ifndef DP_RING_H
#define DP_RING_H

#include "dp_layout.h"

/* fault: an impossible cons was read (bad); sticky, cons_cache keeps the last good one.
 * slots_off, slot_size: the ring's slots as a worker checked them when it attached
 * (dp_worker_attach), private from then on (dp_prod_slot); 0 for other producers. */
struct dp_prod { struct dp_ring *r; uint64_t prod, cons_cache, bad, slots_off;
                 uint32_t size, slot_size; int fault; };
/* next: first index not yet peeked; cons: first index not yet released (cons <= next).
 * fault: an impossible prod was read (bad); sticky, prod_cache keeps the last good one. */
struct dp_cons { struct dp_ring *r; uint64_t next, cons, prod_cache, bad; uint32_t size;
                 int fault; };

/* Read the other side's index (acquire: its accesses to the entries it handed over happen
 * before ours) and take it into *cache only when it moved forward by at most `room`: one
 * unsigned comparison, since an index that went back wraps to a huge distance.  0, or -1 with
 * the value in *bad and *fault set (sticky: nothing more is taken). */
static inline int dp_ring_load_checked(const volatile uint64_t *shared, uint64_t *cache,
                                       uint64_t room, uint64_t *bad, int *fault)
{
    uint64_t v = __atomic_load_n(shared, __ATOMIC_ACQUIRE);
    if (*fault || v - *cache > room) {
        if (!*fault)
            *bad = v;
        *fault = 1;
        return -1;
    }
    *cache = v;
    return 0;
}

/* The consumer's index: cons_cache <= cons <= prod. */
static inline int dp_prod_load_cons(struct dp_prod *p)
{
    return dp_ring_load_checked(&p->r->cons, &p->cons_cache, p->prod - p->cons_cache, &p->bad,
                                &p->fault);
}

/* A fresh producer trusts nothing either: prod - cons <= size (cons ahead of prod wraps). */
static inline void dp_prod_init(struct dp_prod *p, struct dp_ring *r)
{
    p->r = r;
    p->size = r->size;
    p->fault = 0;
    p->slots_off = 0;
    p->slot_size = 0;
    p->prod = __atomic_load_n(&r->prod, __ATOMIC_RELAXED);
    p->cons_cache = __atomic_load_n(&r->cons, __ATOMIC_ACQUIRE);
    p->bad = p->cons_cache;
    if (p->prod - p->cons_cache > p->size) {
        p->fault = 1;
        p->cons_cache = p->prod;   /* nothing is taken on its word */
    }
}

/* Free entries, up to want (0 after a fault).  The acquire on cons orders our later writes into
 * desc[] (and the reuse of slots and mbufs) after the consumer's reads of them. */
static inline uint32_t dp_ring_reserve(struct dp_prod *p, uint32_t want)
{
    uint32_t free_n = p->size - (uint32_t)(p->prod - p->cons_cache);
    if (free_n < want || p->fault) {
        if (dp_prod_load_cons(p) < 0)
            return 0;
        free_n = p->size - (uint32_t)(p->prod - p->cons_cache);
    }
    return free_n < want ? free_n : want;
}

static inline struct dp_desc *dp_ring_at(struct dp_ring *r, uint64_t idx)
{
    return &r->desc[idx & r->mask];
}

/* The same, masked with the producer's own copy of the size: a worker never writes outside
 * desc[] whatever the shared mask says. */
static inline struct dp_desc *dp_prod_at(const struct dp_prod *p, uint64_t idx)
{
    return &p->r->desc[idx & (p->size - 1)];
}

/* The release on prod publishes the descriptors (and frame bytes) written before it. */
static inline void dp_ring_submit(struct dp_prod *p, uint32_t n)
{
    p->prod += n;
    __atomic_store_n(&p->r->prod, p->prod, __ATOMIC_RELEASE);
}

/* The producer's index: prod_cache <= prod <= cons + size. */
static inline int dp_cons_load_prod(struct dp_cons *c)
{
    return dp_ring_load_checked(&c->r->prod, &c->prod_cache, c->cons + c->size - c->prod_cache,
                                &c->bad, &c->fault);
}

static inline void dp_cons_init(struct dp_cons *c, struct dp_ring *r)
{
    c->r = r;
    c->size = r->size;
    c->fault = 0;
    c->next = c->cons = __atomic_load_n(&r->cons, __ATOMIC_RELAXED);
    c->prod_cache = c->cons;
    dp_cons_load_prod(c);
}

/* Entries ready, up to max, contiguous in desc[] (a batch never wraps); *start gets the index
 * of the first.  They are taken: the next peek starts after them.  0 after a fault. */
static inline uint32_t dp_ring_peek(struct dp_cons *c, uint32_t max, uint64_t *start)
{
    uint32_t avail = (uint32_t)(c->prod_cache - c->next);
    *start = c->next;
    if (avail == 0 || c->fault) {
        if (dp_cons_load_prod(c) < 0)
            return 0;
        avail = (uint32_t)(c->prod_cache - c->next);
    }
    uint32_t to_end = c->size - (uint32_t)(c->next & (c->size - 1));
    if (avail > to_end) avail = to_end;
    if (avail > max) avail = max;
    c->next += avail;
    return avail;
}

/* Hand back the last n entries of the latest peek: the next peek returns them again. */
static inline void dp_ring_cancel(struct dp_cons *c, uint32_t n)
{
    c->next -= n;
}

/* Give back the n oldest peeked entries.  release: our reads of desc[] and the frames happen
 * before the producer may reuse them. */
static inline void dp_ring_release(struct dp_cons *c, uint32_t n)
{
    c->cons += n;
    __atomic_store_n(&c->r->cons, c->cons, __ATOMIC_RELEASE);
}

/* Why side `of` ("consumer" for a producer's fault, "producer" for a consumer's) read an
 * impossible index: bad, against mine (this side's own index) and last (the last good one).  A
 * line for an error field, ending in "(corrupted or foreign writer)".  core/common.c. */
void dp_ring_why(char *out, unsigned long len, int producer_side, uint64_t bad, uint64_t mine,
                 uint64_t last, uint32_t size);

/* Byte offset in the arena of the copy-mode slot of ring position idx (idx & mask). */
static inline uint64_t dp_ring_slot(const struct dp_arena *a, const struct dp_ring *r,
                                    uint64_t idx)
{
    return r->slots_off + (idx & r->mask) * (uint64_t)a->slot_size;
}

/* The same, from the worker's private copy of the geometry: what a worker hands the kernel or
 * copies into cannot be moved by a write to the shared ring header. */
static inline uint64_t dp_prod_slot(const struct dp_prod *p, uint64_t idx)
{
    return p->slots_off + (idx & (p->size - 1)) * (uint64_t)p->slot_size;
}

#endif
