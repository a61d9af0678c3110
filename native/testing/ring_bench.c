/* ring_bench.c: a test producer and consumer for the descriptor ring, through dp_ring.h only.
 *
 * Unlike a worker, dp_bench_produce waits for room, so a test can push an exact sequence.
 * Descriptor idx (the ring's free-running index) carries:
 *   hash = (uint32_t)idx          the sequence number readers check order with
 *   addr = the slot of position idx & mask, len = 60 + idx % 1024, rx_ns = one clock per burst
 *   ethertype, l4proto alternate (IPv4/IPv6, TCP/UDP) so per-batch aggregates have work to do.
 * Both loops return early when arena->stop is set, so a benchmark can run them for a time.
 * On a full ring the producer backs off for ~64 pauses before it reads cons again: re-reading
 * it in a tight loop steals the line the consumer is writing and slows the consumer by several
 * times on this box, which a worker (it drops, then polls its NIC) would not do.
 */
#include "dp_common.h"
#include "dp_testing.h"

static int stopped(const struct dp_arena *a)
{
    return __atomic_load_n(&a->stop, __ATOMIC_RELAXED) != 0;
}

static void fill(const struct dp_arena *a, struct dp_ring *r, uint64_t idx, uint32_t n)
{
    uint64_t rx_ns = dp_real_ns();
    for (uint32_t i = 0; i < n; i++, idx++) {
        struct dp_desc *d = dp_ring_at(r, idx);
        d->addr = dp_ring_slot(a, r, idx);
        d->rx_ns = rx_ns;
        d->hash = (uint32_t)idx;
        d->len = (uint16_t)(60 + (idx & 1023));
        d->flags = 0;
        d->ethertype = (idx & 2) ? 0x86dd : 0x0800;
        d->port = r->port;
        d->queue = (uint8_t)r->queue;
        d->l4proto = (idx & 1) ? 6 : 17;
        d->l4_off = (idx & 2) ? 54 : 34;
    }
}

uint64_t dp_bench_produce(void *arena_base, uint32_t ring, uint64_t n, uint32_t burst)
{
    const struct dp_arena *a = arena_base;
    struct dp_ring *r = dp_arena_ring(arena_base, ring);
    struct dp_prod p;
    uint64_t full = 0;
    int waiting = 0;

    dp_prod_init(&p, r);
    for (uint64_t done = 0; done < n && !stopped(a);) {
        uint32_t want = n - done < burst ? (uint32_t)(n - done) : burst;
        uint32_t got = dp_ring_reserve(&p, want);
        if (got == 0) {
            full += !waiting;       /* count episodes, not spins */
            waiting = 1;
            for (int i = 0; i < 64; i++)
                __builtin_ia32_pause();
            continue;
        }
        waiting = 0;
        fill(a, r, p.prod, got);
        dp_ring_submit(&p, got);
        done += got;
    }
    return full;
}

uint32_t dp_bench_try_produce(void *arena_base, uint32_t ring, uint32_t n)
{
    struct dp_ring *r = dp_arena_ring(arena_base, ring);
    struct dp_prod p;

    dp_prod_init(&p, r);
    uint32_t got = dp_ring_reserve(&p, n);
    fill(arena_base, r, p.prod, got);
    dp_ring_submit(&p, got);
    return got;
}

uint64_t dp_bench_consume(void *arena_base, uint32_t ring, uint64_t n, uint32_t batch)
{
    const struct dp_arena *a = arena_base;
    struct dp_ring *r = dp_arena_ring(arena_base, ring);
    struct dp_cons c;
    uint64_t sum = 0;

    dp_cons_init(&c, r);
    for (uint64_t done = 0; done < n && !stopped(a);) {
        uint64_t start;
        uint32_t want = n - done < batch ? (uint32_t)(n - done) : batch;
        uint32_t got = dp_ring_peek(&c, want, &start);
        if (got == 0) {
            __builtin_ia32_pause();
            continue;
        }
        for (uint32_t i = 0; i < got; i++)
            sum += dp_ring_at(r, start + i)->len;
        dp_ring_release(&c, got);
        done += got;
    }
    return sum;
}
