/* transport_produce.c: a test producer for the transport tests and benchmarks (dp_testing.h):
 * frames that end in a dp_gen_trailer whose seq is the ring index, so the far end can check
 * every one arrived, in order, with its bytes. */
#include <string.h>
#include <unistd.h>

#include "dp_common.h"
#include "dp_testing.h"

uint64_t dp_transport_produce(void *arena_base, uint32_t ring, uint64_t n, uint32_t frame_len,
                              uint32_t burst, uint32_t stream)
{
    struct dp_arena *a = arena_base;
    struct dp_ring *r = dp_arena_ring(arena_base, ring);
    struct dp_prod p;
    uint64_t done = 0;

    if (frame_len < sizeof(struct dp_gen_trailer) || frame_len > a->slot_size)
        return 0;
    dp_prod_init(&p, r);
    while (done < n && !__atomic_load_n(&a->stop, __ATOMIC_RELAXED)) {
        uint32_t want = n - done < burst ? (uint32_t)(n - done) : burst;
        uint32_t got = dp_ring_reserve(&p, want);
        if (got == 0) {
            usleep(20);
            continue;
        }
        uint64_t now = dp_real_ns();
        for (uint32_t i = 0; i < got; i++) {
            uint64_t idx = p.prod + i;
            struct dp_desc *d = dp_ring_at(r, idx);
            d->addr = dp_ring_slot(a, r, idx);
            uint8_t *f = (uint8_t *)a + d->addr;
            memset(f, (int)(idx & 0xff), 16);   /* something to compare besides the trailer */
            struct dp_gen_trailer tr = { idx, now, stream, DP_GEN_MAGIC };
            memcpy(f + frame_len - sizeof(tr), &tr, sizeof(tr));
            d->rx_ns = now;
            d->hash = (uint32_t)idx;
            d->len = (uint16_t)frame_len;
            d->flags = DP_F_GENERATED;
            d->ethertype = 0x0800;
            d->port = r->port;
            d->queue = (uint8_t)r->queue;
            d->l4proto = 17;
            d->l4_off = 34;
        }
        dp_ring_submit(&p, got);
        done += got;
    }
    return done;
}
