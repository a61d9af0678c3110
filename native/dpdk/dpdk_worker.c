/* dpdk_worker.c: the DPDK poll-mode worker loop, l2fwd style.
 *
 * while (!stop): for each ring (port-major, as the arena's rings): give back the mbufs the
 * consumer released, burst in, describe each frame in the ring, count once per burst; then one
 * generator burst if it is time; a TSC check gates the periodic work (heartbeat, NIC stats,
 * loop counters).  Nothing in the loop allocates, logs or fails; a full ring is a counted drop.
 *
 * Zero copy: descriptors point at the mbuf's data inside the arena pool; the mbuf is kept in a
 * private shadow array at the ring position and freed once the consumer moves cons past it.
 * Copy mode: the frame is copied into the ring position's slot and the mbuf freed at once.
 * Set-up and tear-down are in dpdk_port.c.
 */
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include <rte_cycles.h>
#include <rte_ip.h>

#include "dp_dpdk.h"
#include "dp_gen.h"

/* ---- receive ---- */

/* Free the mbufs behind ring positions the consumer has given back.  Called before every RX
 * burst, so even a pool drained to zero (rx_burst returning nothing) refills.  Only up to a
 * checked cons (dp_ring.h): freed <= cons_cache <= prod, so no mbuf is freed twice, and after a
 * fault nothing more is freed (the loop then stops the worker). */
static inline void dpw_reclaim(struct dpw_ring *q)
{
    if (q->freed == q->p.prod || dp_prod_load_cons(&q->p) < 0)
        return;
    uint64_t cons = q->p.cons_cache;
    while (q->freed != cons) {
        uint32_t pos = (uint32_t)(q->freed & (q->p.size - 1));
        uint32_t n = (uint32_t)(cons - q->freed);
        if (n > q->p.size - pos)
            n = q->p.size - pos;
        rte_pktmbuf_free_bulk(&q->shadow[pos], n);
        q->freed += n;
    }
}

/* Describe one frame; returns 1 when it was copied into the slot (its mbuf can go back now).
 *
 * Copybreak, as NIC drivers' rx_copybreak: a frame of at most cfg->copybreak bytes is copied
 * into its ring slot even in zero-copy mode.  Holding the mbuf until Python releases it costs
 * more than copying a line or two: the held mbufs make the pool circulate cold, and every
 * allocation in the PMD misses the cache (memif at 64 B measured 6.8 Mpps zero copy against
 * 13.6 Mpps copied, perf/rx_vs_testpmd.py).  Larger frames stay where the PMD wrote them. */
static inline int dpw_describe(struct dpw *w, struct dpw_ring *q, struct rte_mbuf *m,
                               struct dp_desc *d, uint64_t idx, uint64_t ns,
                               struct dp_ring_counters *c)
{
    const uint8_t *frame = rte_pktmbuf_mtod(m, const uint8_t *);
    uint32_t len = m->data_len;            /* first segment only */
    uint16_t flags = m->nb_segs > 1 ? DP_F_TRUNCATED : 0;
    uint64_t addr;
    int copy = !w->zero_copy || len <= w->cfg->copybreak;
    if (!copy) {
        addr = (uint64_t)(frame - (const uint8_t *)w->base);
        q->shadow[idx & (q->p.size - 1)] = m;
    } else {
        if (w->zero_copy)
            q->shadow[idx & (q->p.size - 1)] = NULL;   /* nothing to free on release */
        addr = dp_prod_slot(&q->p, idx);
        if (len > q->p.slot_size) {
            len = q->p.slot_size;
            flags |= DP_F_TRUNCATED;
        }
        memcpy(w->base + addr, frame, len);
        frame = (const uint8_t *)w->base + addr;
        flags |= DP_F_COPIED;
    }
    dp_describe(d, frame, addr, len, flags, ns, q->port, q->queue, 0, c);
    return copy;
}

/* One RX burst on one ring; returns the packets taken off the NIC. */
static inline uint32_t dpw_rx(struct dpw *w, struct dpw_ring *q)
{
    struct rte_mbuf *m[DPW_MAX_BURST];
    if (w->zero_copy)
        dpw_reclaim(q);
    uint16_t n = rte_eth_rx_burst(q->port_id, q->queue, m, (uint16_t)w->cfg->burst);
    if (n == 0)
        return 0;
    uint64_t ns = dp_real_ns();
    struct dp_ring_counters *c = &q->r->c;
    uint32_t room = dp_ring_reserve(&q->p, n);
    uint64_t bytes = 0;
    struct rte_mbuf *done[DPW_MAX_BURST];   /* copied, or dropped: back to the pool now */
    uint32_t n_done = 0;
    for (uint32_t i = 0; i < room; i++) {
        bytes += m[i]->pkt_len;
        if (dpw_describe(w, q, m[i], dp_prod_at(&q->p, q->p.prod + i), q->p.prod + i, ns, c))
            done[n_done++] = m[i];
    }
    dp_ring_submit(&q->p, room);
    c->copied += n_done;
    if (room < n) {   /* the consumer is behind: drop and count, never block or overwrite */
        for (uint32_t i = room; i < n; i++)
            done[n_done++] = m[i];
        c->ring_full_drops += n - room;
    }
    if (n_done)
        rte_pktmbuf_free_bulk(done, n_done);
    c->rx_packets += room;
    c->rx_bytes += bytes;
    c->bursts++;
    return n;
}

/* ---- generate ---- */

/* The frame rules and the token bucket are dp_gen.h's, shared with the io_uring worker. */
struct dpw_gen {
    int on, link_up;
    uint16_t port_id, queue;
    struct dp_gen_state s;
};

static int dpw_gen_init(struct dpw *w, struct dpw_gen *g)
{
    const struct dp_gen_config *gc = &w->cfg->gen;
    memset(g, 0, sizeof(*g));
    if (!gc->enabled)
        return 0;
    if (gc->port >= w->cfg->n_ports ||
        gc->queue >= RTE_MAX(w->cfg->port[gc->port].n_txq, (uint16_t)1))
        return dpw_fail(w, "generator: port %u queue %u is not configured", gc->port, gc->queue);
    char why[DP_ERR_LEN];
    if (dp_gen_prepare(&g->s, gc, w->a->gen, RTE_MBUF_DEFAULT_DATAROOM, DPW_MAX_BURST,
                       rte_get_tsc_hz(), rte_rdtsc(), why, sizeof(why)) < 0)
        return dpw_fail(w, "%s", why);
    g->on = 1;
    g->port_id = w->port_id[gc->port];
    g->queue = gc->queue;
    return 0;
}

/* One burst of stream i when its token bucket allows; returns packets the port took. */
static inline uint32_t dpw_gen_stream(struct dpw *w, struct dpw_gen *g, uint32_t i,
                                      uint64_t now)
{
    const struct dp_gen_config *gc = &w->cfg->gen;
    uint32_t n = dp_gen_due(&g->s, gc, i, now);
    if (n == 0)
        return 0;
    struct rte_mbuf *m[DPW_MAX_BURST];
    struct dp_port_counters *pc = &w->a->port[gc->port];
    struct dp_gen_stream_ctl *sc = &w->a->gen[i];
    if (rte_pktmbuf_alloc_bulk(w->pool, m, n) != 0) {
        /* pool empty: the frames were never built, no seq was issued.  The port counts them
         * dropped; the stream does not, so its issued = tx_packets + tx_drops holds. */
        pc->tx_drops += n;
        return 0;
    }
    uint64_t ns = dp_real_ns();
    uint32_t len[DPW_MAX_BURST];   /* a sent mbuf is the PMD's: its length is read before */
    for (uint32_t j = 0; j < n; j++) {
        len[j] = dp_gen_fill(&g->s, gc, i, rte_pktmbuf_mtod(m[j], uint8_t *), sc, ns);
        m[j]->data_len = (uint16_t)len[j];
        m[j]->pkt_len = len[j];
    }
    uint16_t k = rte_eth_tx_burst(g->port_id, g->queue, m, (uint16_t)n);
    uint64_t bytes = 0;
    for (uint32_t j = 0; j < k; j++)
        bytes += len[j];
    if (k < n) {   /* not taken: freed and counted as dropped */
        rte_pktmbuf_free_bulk(m + k, n - k);
        pc->tx_drops += n - k;
        sc->tx_drops += n - k;
    }
    /* Every sequence number is issued once, taken or not: af_packet's TX returns 0 when its
     * sendto() fails although the frames already sit in its TX ring and leave later, so
     * reusing "untaken" numbers produced duplicates.  Issued = tx_packets + tx_drops. */
    pc->gen_seq += n;
    pc->tx_packets += k;
    pc->tx_bytes += bytes;
    sc->tx_packets += k;
    sc->tx_bytes += bytes;
    if (dp_gen_took(&g->s, gc, i, k))
        g->on = 0;
    return k;
}

/* Every stream that still has packets to send, one burst each. */
static inline uint32_t dpw_gen(struct dpw *w, struct dpw_gen *g, uint64_t now)
{
    uint32_t moved = 0;
    for (uint32_t i = 0; i < g->s.n && g->on; i++)
        if (!g->s.s[i].done)
            moved += dpw_gen_stream(w, g, i, now);
    return moved;
}
/* ---- the loop ---- */

/* A ring whose consumer index was impossible (dp_ring.h) stops the worker: 0, or -1 with the
 * error recorded.  Checked with the periodic work: until then the ring only drops. */
static int dpw_check_rings(struct dpw *w)
{
    for (uint32_t i = 0; i < w->n_rings; i++)
        if (w->ring[i].p.fault)
            return dp_worker_ring_fault(w->a, w->cfg, "dpdk", i, &w->ring[i].p);
    return 0;
}

/* Until stopped (0), or until a ring's consumer index is impossible (-1, recorded). */
static int dpw_loop(struct dpw *w, struct dpw_gen *g)
{
    int rc = 0;
    struct dp_arena *a = w->a;
    uint64_t hz = rte_get_tsc_hz(), tick = hz / 100, idle_after = hz / 1000;
    uint64_t prev = rte_rdtsc(), next_tick = prev, last_move = prev;
    uint64_t loops = 0, busy = 0, total = 0;
    uint32_t moved = 0;
    while (!__atomic_load_n(&a->stop, __ATOMIC_RELAXED)) {
        uint64_t now = rte_rdtsc();
        total += now - prev;
        if (moved) {
            busy += now - prev;
            last_move = now;
        }
        prev = now;
        loops++;
        moved = 0;
        if (dpw_guard_enter()) {   /* not while a PMD's control callback runs: intr_guard.c */
            for (uint32_t i = 0; i < w->n_rings; i++)
                moved += dpw_rx(w, &w->ring[i]);
            if (g->on && g->link_up)
                moved += dpw_gen(w, g, now);
            dpw_guard_leave();
        } else {
            sched_yield();
        }
        if (now >= next_tick) {   /* periodic work, ~every 10 ms */
            next_tick = now + tick;
            a->loops += loops;
            a->busy_cycles += busy;
            a->total_cycles += total;
            loops = busy = total = 0;
            dp_heartbeat(&a->heartbeat_ns);
            dpw_nic_stats(w);
            if ((rc = dpw_check_rings(w)) < 0)
                break;
            if (g->on)
                dp_gen_tick(&g->s, a->gen);   /* a rate Python changed */
            if (g->on && !g->link_up) {   /* memif: nobody to send to before the peer connects */
                struct rte_eth_link link;
                if (rte_eth_link_get_nowait(g->port_id, &link) == 0 && link.link_status) {
                    g->link_up = 1;
                    dp_gen_restart_clock(&g->s, rte_rdtsc());
                }
            }
        }
        /* a 2-core lab box cannot afford every worker spinning */
        if (!moved && w->cfg->idle_sleep_us && now - last_move > idle_after)
            usleep(w->cfg->idle_sleep_us);
    }
    a->loops += loops;
    a->busy_cycles += busy;
    a->total_cycles += total;
    return rc;
}

int dp_dpdk_worker_run(void *arena_base, const struct dp_worker_config *cfg)
{
    static struct dpw w;   /* ~DP_MAX_RINGS rings of private state; one worker per process */
    struct dpw_gen g;
    memset(&w, 0, sizeof(w));
    w.base = arena_base;
    w.a = arena_base;
    w.cfg = cfg;
    w.a->error[0] = '\0';
    if (dpw_setup(&w) < 0 || dpw_gen_init(&w, &g) < 0) {
        dpw_close(&w);
        return -1;
    }
    __atomic_store_n(&w.a->state, DP_W_RUNNING, __ATOMIC_RELEASE);
    int rc = dpw_loop(&w, &g);
    dpw_close(&w);
    if (rc < 0)
        return -1;   /* failed, the reason in the arena's error */
    __atomic_store_n(&w.a->state, DP_W_STOPPED, __ATOMIC_RELEASE);
    return 0;
}
