/* dp_ring.h: SPSC descriptor ring operations.
 *
 * Producer (worker): dp_ring_reserve() how many it may write, fill desc[], dp_ring_submit().
 * Consumer: dp_ring_peek() a contiguous batch (this takes it: the next peek starts after it),
 * read it, dp_ring_release() to give its slots back.  A consumer may hold several peeked batches
 * before it releases the oldest (the TCP sender keeps batches in flight until acknowledged), and
 * dp_ring_cancel() hands back the tail of a peek it did not use.  As xdp-tools' xsk ring: each
 * side caches the other's index and reads the shared one only when the cache runs out.
 */
#ifndef DP_RING_H
#define DP_RING_H

#include "dp_layout.h"

struct dp_prod { struct dp_ring *r; uint64_t prod, cons_cache; };
/* next: first index not yet peeked; cons: first index not yet released (cons <= next). */
struct dp_cons { struct dp_ring *r; uint64_t next, cons, prod_cache; };

static inline void dp_prod_init(struct dp_prod *p, struct dp_ring *r)
{
    p->r = r;
    p->prod = __atomic_load_n(&r->prod, __ATOMIC_RELAXED);
    p->cons_cache = __atomic_load_n(&r->cons, __ATOMIC_ACQUIRE);
}

/* Free entries, up to want.  The acquire on cons orders our later writes into desc[] (and the
 * reuse of slots and mbufs) after the consumer's reads of them. */
static inline uint32_t dp_ring_reserve(struct dp_prod *p, uint32_t want)
{
    uint32_t free_n = p->r->size - (uint32_t)(p->prod - p->cons_cache);
    if (free_n < want) {
        p->cons_cache = __atomic_load_n(&p->r->cons, __ATOMIC_ACQUIRE);
        free_n = p->r->size - (uint32_t)(p->prod - p->cons_cache);
    }
    return free_n < want ? free_n : want;
}

static inline struct dp_desc *dp_ring_at(struct dp_ring *r, uint64_t idx)
{
    return &r->desc[idx & r->mask];
}

/* The release on prod publishes the descriptors (and frame bytes) written before it. */
static inline void dp_ring_submit(struct dp_prod *p, uint32_t n)
{
    p->prod += n;
    __atomic_store_n(&p->r->prod, p->prod, __ATOMIC_RELEASE);
}

static inline void dp_cons_init(struct dp_cons *c, struct dp_ring *r)
{
    c->r = r;
    c->next = c->cons = __atomic_load_n(&r->cons, __ATOMIC_RELAXED);
    c->prod_cache = __atomic_load_n(&r->prod, __ATOMIC_ACQUIRE);
}

/* Entries ready, up to max, contiguous in desc[] (a batch never wraps); *start gets the index
 * of the first.  They are taken: the next peek starts after them. */
static inline uint32_t dp_ring_peek(struct dp_cons *c, uint32_t max, uint64_t *start)
{
    uint32_t avail = (uint32_t)(c->prod_cache - c->next);
    if (avail == 0) {
        /* acquire: descriptors written before the producer's release are visible now */
        c->prod_cache = __atomic_load_n(&c->r->prod, __ATOMIC_ACQUIRE);
        avail = (uint32_t)(c->prod_cache - c->next);
    }
    uint32_t to_end = c->r->size - (uint32_t)(c->next & c->r->mask);
    if (avail > to_end) avail = to_end;
    if (avail > max) avail = max;
    *start = c->next;
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

/* Byte offset in the arena of the copy-mode slot of ring position idx (idx & mask). */
static inline uint64_t dp_ring_slot(const struct dp_arena *a, const struct dp_ring *r,
                                    uint64_t idx)
{
    return r->slots_off + (idx & r->mask) * (uint64_t)a->slot_size;
}

#endif
