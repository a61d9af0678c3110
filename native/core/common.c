/* common.c: recording a failure and attaching a worker to its arena (dp_common.h), the set-up
 * both workers (DPDK and io_uring) share. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "dp_common.h"

#define DP_DRAIN_WAIT_S 5

int dp_vfail(char *error, volatile uint32_t *state, const char *who, const char *fmt,
             va_list ap)
{
    vsnprintf(error, DP_ERR_LEN, fmt, ap);
    if (who != NULL)
        fprintf(stderr, "%s: %s\n", who, error);
    __atomic_store_n(state, DP_W_FAILED, __ATOMIC_RELEASE);
    return -1;
}

int dp_worker_fail(struct dp_arena *a, const struct dp_worker_config *cfg, const char *kind,
                   const char *fmt, ...)
{
    char who[48];
    snprintf(who, sizeof(who), "%s worker %u", kind, cfg->worker_id);
    va_list ap;
    va_start(ap, fmt);
    dp_vfail(a->error, &a->state, who, fmt, ap);
    va_end(ap);
    return -1;
}

void dp_ring_why(char *out, unsigned long len, int producer_side, uint64_t bad, uint64_t mine,
                 uint64_t last, uint32_t size)
{
    const char *of = producer_side ? "consumer" : "producer";
    const char *me = producer_side ? "producer" : "consumer";
    unsigned long long b = bad, m = mine, l = last;
    int64_t ahead = (int64_t)(bad - mine);   /* of the other side's index over mine */
    if (producer_side ? ahead > 0 : ahead < 0)
        snprintf(out, len, "%s index %llu %s %s %llu", of, b, producer_side ? "ahead of" :
                 "behind", me, m);
    else if ((producer_side ? mine - bad : bad - mine) > size)
        snprintf(out, len, "%s index %llu more than the ring's %u %s %s %llu", of, b, size,
                 producer_side ? "behind" : "ahead of", me, m);
    else
        snprintf(out, len, "%s index %llu went back from %llu (%s %llu)", of, b, l, me, m);
    size_t n = strlen(out);
    snprintf(out + n, len - n, " (corrupted or foreign writer)");
}

int dp_worker_ring_fault(struct dp_arena *a, const struct dp_worker_config *cfg, const char *kind,
                         uint32_t i, const struct dp_prod *p)
{
    char why[DP_ERR_LEN];
    dp_ring_why(why, sizeof(why), 1, p->bad, p->prod, p->cons_cache, p->size);
    return dp_worker_fail(a, cfg, kind, "ring %u: %s", i, why);
}

int dp_worker_attach(struct dp_arena *a, const struct dp_worker_config *cfg, const char *kind,
                     uint32_t max_burst, uint32_t max_ring_size, struct dp_prod *prod)
{
    if (cfg->n_ports == 0 || cfg->n_ports > DP_MAX_PORTS || cfg->n_ports != a->n_ports)
        return dp_worker_fail(a, cfg, kind, "config has %u ports, the arena %u (1..%d)",
                              cfg->n_ports, a->n_ports, DP_MAX_PORTS);
    if (cfg->burst == 0 || cfg->burst > max_burst)
        return dp_worker_fail(a, cfg, kind, "burst %u out of range 1..%u", cfg->burst,
                              max_burst);
    a->pid = getpid();
    __atomic_store_n(&a->state, DP_W_STARTING, __ATOMIC_RELEASE);
    dp_heartbeat(&a->heartbeat_ns);
    uint32_t want = 0;
    for (uint32_t p = 0; p < cfg->n_ports; p++)
        want += cfg->port[p].n_rxq;
    if (want != a->n_rings)
        return dp_worker_fail(a, cfg, kind, "config has %u RX queues in all, the arena has %u "
                              "rings", want, a->n_rings);
    struct dp_arena geo;   /* the header's offsets are the ones its geometry gives */
    if (dp_arena_layout(&geo, a->n_ports, a->n_rings, a->ring_size, a->slot_size,
                        a->pool_len) < 0 || geo.rings_off != a->rings_off ||
        geo.ring_stride != a->ring_stride || geo.slots_off != a->slots_off ||
        geo.pool_off != a->pool_off || geo.arena_size != a->arena_size)
        return dp_worker_fail(a, cfg, kind, "arena header: offsets are not the ones of its "
                              "geometry (corrupted or foreign writer)");
    if (a->ring_size > max_ring_size)
        return dp_worker_fail(a, cfg, kind, "ring_size %u: the %s worker takes at most %u",
                              a->ring_size, kind, max_ring_size);
    for (uint32_t i = 0; i < a->n_rings; i++) {
        struct dp_ring *r = dp_arena_ring(a, i);
        uint64_t left;
        if (r->size != a->ring_size || r->mask != r->size - 1 ||
            r->slots_off != a->slots_off + (uint64_t)i * a->ring_size * a->slot_size)
            return dp_worker_fail(a, cfg, kind, "ring %u: size %u mask %u slots at %llu, the "
                                  "arena says size %u (corrupted or foreign writer)", i, r->size,
                                  r->mask, (unsigned long long)r->slots_off, a->ring_size);
        int rc = dp_ring_wait_drained(a, i, DP_DRAIN_WAIT_S, &left);
        if (rc == -3) {   /* impossible indices: waiting would not end it */
            char why[DP_ERR_LEN];
            dp_ring_why(why, sizeof(why), 1, r->cons, r->prod, r->prod, r->size);
            return dp_worker_fail(a, cfg, kind, "ring %u: %s", i, why);
        }
        if (rc < 0)
            return dp_worker_fail(a, cfg, kind, "ring %u (port %u queue %u): consumer still "
                                  "holds %lu descriptors of a previous worker %s", i, r->port,
                                  r->queue, (unsigned long)left, rc == -2 ?
                                  "when told to stop" : "after waiting 5 s");
        if (r->port >= cfg->n_ports || r->queue >= cfg->port[r->port].n_rxq)
            return dp_worker_fail(a, cfg, kind, "ring %u names port %u queue %u, not in the "
                                  "config", i, r->port, r->queue);
        dp_prod_init(&prod[i], r);
        prod[i].slots_off = r->slots_off;   /* checked above; private from here on */
        prod[i].slot_size = a->slot_size;
    }
    return 0;
}
