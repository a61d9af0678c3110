/* uring_worker.c: the io_uring worker loop, the DPDK worker's sibling for hosts without DPDK.
 *
 * Each arena ring has one socket (AF_PACKET in a fanout, or UDP) with a multishot receive whose
 * provided buffers ARE the ring's slots: the kernel writes each packet straight into shared
 * memory and the worker only publishes descriptors.  Ring positions and buffers are decoupled:
 * a completion names its buffer (bid), the descriptor at the next ring position points at slot
 * bid, and bid[pos] remembers it; the buffer goes back to the kernel only after the consumer
 * released that position.  So kernel-held + published = ring_size: the ring can never be full
 * when a packet arrives.  A consumer that holds every slot starves the kernel instead: the
 * multishot ends with -ENOBUFS (counted), packets wait in the socket (its overflow is counted
 * in nic_missed), and the receive is re-armed (counted) as soon as slots come back.
 *
 * Descriptor meaning.  AF_PACKET: the raw frame, parsed by dp_parse like the DPDK worker's.
 * UDP: the datagram's payload only; ethertype 0, l4proto 17, l4_off 0, hash 0 (a plain recv
 * does not tell the sender), DP_F_GENERATED when the payload ends with our trailer.
 * DP_F_COPIED is not set: the kernel's write into the slot is the packet's one write.
 *
 * The loop is dpdk_worker.c's: give back released slots, re-arm, one generator burst, reap a
 * batch of completions, publish once per ring per batch, periodic work every ~10 ms.
 *
 * poll = "adaptive" (idle_sleep_us > 0) and no generator: a reap that found less than a burst
 * naps idle_sleep_us (at most URW_NAP_US: a long idle nap must not overflow the socket under
 * load) in a plain sleep, and the next reap takes what arrived meanwhile in one
 * go.  Not in an io_uring wait: the kernel's receive path wakes a task waiting there at the
 * first packet (a poll-driven task_work is never a lazy wake), which on a veth is the sending
 * core paying a wake-up per packet or two; a sleeping task is woken by its own timer only,
 * and the socket's buffer (URW_RCVBUF) holds what comes meanwhile.  Measured with
 * perf/ingest_vs_recvmmsg.py: a worker that spun on partial batches used a whole core at any
 * rate.  After ~1 ms without any packet it waits in io_uring instead (woken by the first).
 */
#define _GNU_SOURCE   /* sendmmsg, struct mmsghdr */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "dp_uring.h"

#define URW_NAP_US 50u   /* the longest nap after a partial batch */

/* Loop accounting in TSC cycles, as the DPDK worker's busy/total cycles. */
static inline uint64_t cycles(void)
{
#if defined(__x86_64__) || defined(__i386__)
    return __builtin_ia32_rdtsc();
#else
    return dp_mono_ns();
#endif
}

/* Give back the buffers behind ring positions the consumer has released: only up to a checked
 * cons (dp_ring.h), returned <= cons_cache <= prod, so no buffer id goes back to the kernel
 * twice; after a fault none does (the loop then stops the worker). */
static inline void urw_reclaim(struct urw *w, struct urw_ring *q)
{
    if (q->returned == q->p.prod || dp_prod_load_cons(&q->p) < 0)
        return;
    uint64_t cons = q->p.cons_cache;
    uint32_t n = (uint32_t)(cons - q->returned);
    if (n == 0)
        return;
    for (uint32_t i = 0; i < n; i++)
        urw_give_back(w, q, q->bid[(q->returned + i) & (q->p.size - 1)], i);
    io_uring_buf_ring_advance(q->br, (int)n);   /* release store: the kernel sees them now */
    q->returned = cons;
}

/* (Re-)submit the multishot receive, once the kernel has at least one buffer to fill. */
static inline void urw_arm(struct urw *w, struct urw_ring *q, uint32_t i)
{
    if (q->p.prod - q->returned >= q->p.size)
        return;   /* every slot is with the consumer: arming would only end in ENOBUFS again */
    struct io_uring_sqe *sqe = io_uring_get_sqe(&w->uring);
    if (sqe == NULL)
        return;   /* SQ full: next loop */
    /* MSG_TRUNC: the completion reports the packet's real length, so truncation is seen */
    io_uring_prep_recv_multishot(sqe, q->fd, NULL, 0, MSG_TRUNC);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = (uint16_t)i;
    io_uring_sqe_set_data64(sqe, i);
    q->armed = 1;
    q->uc->rearms += q->ever_armed;
    q->ever_armed = 1;
}

/* Describe the packet the kernel put in slot bid at ring index idx. */
static inline void urw_describe(struct urw *w, struct urw_ring *q, uint16_t bid, uint32_t res,
                                uint64_t ns)
{
    uint64_t idx = q->p.prod + q->n;
    struct dp_desc *d = dp_prod_at(&q->p, idx);
    struct dp_ring_counters *c = &q->r->c;
    uint64_t addr = dp_prod_slot(&q->p, bid);
    const uint8_t *frame = (const uint8_t *)w->base + addr;
    uint32_t len = res;
    uint16_t flags = 0;
    if (len > q->p.slot_size) {
        len = q->p.slot_size;
        flags |= DP_F_TRUNCATED;
    }
    q->bid[idx & (q->p.size - 1)] = bid;
    /* UDP: the datagram's payload, l4proto 17, not parsed */
    dp_describe(d, frame, addr, len, flags, ns, q->port, q->queue,
                q->kind == URW_RAW ? 0 : 17, c);
    q->bytes += res;
    q->n++;
}

/* One batch of completions; returns the packets published. */
static uint32_t urw_reap(struct urw *w)
{
    struct io_uring_cqe *cqes[URW_MAX_BURST];
    unsigned n = io_uring_peek_batch_cqe(&w->uring, cqes, w->cfg->burst * w->n_rings <
                                         URW_MAX_BURST ? w->cfg->burst * w->n_rings :
                                         URW_MAX_BURST);
    if (n == 0)
        return 0;
    uint64_t ns = dp_real_ns();
    for (unsigned k = 0; k < n; k++) {
        struct io_uring_cqe *cqe = cqes[k];
        uint64_t i = io_uring_cqe_get_data64(cqe);
        if (i >= w->n_rings)
            continue;
        struct urw_ring *q = &w->ring[i];
        q->uc->cqes++;
        if (!(cqe->flags & IORING_CQE_F_MORE))
            q->armed = 0;   /* this multishot is over: re-armed by the loop */
        if (cqe->res < 0 || !(cqe->flags & IORING_CQE_F_BUFFER)) {
            if (cqe->res == -ENOBUFS)
                q->uc->enobufs++;
            else
                q->uc->recv_errors++;
            continue;
        }
        uint16_t bid = (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
        if (q->p.prod + q->n - q->p.cons_cache >= q->p.size &&
            dp_ring_reserve(&q->p, q->n + 1) < q->n + 1) {
            /* cannot happen while kernel-held + published = ring_size; never overwrite */
            q->r->c.ring_full_drops++;
            urw_give_back(w, q, bid, 0);
            io_uring_buf_ring_advance(q->br, 1);
            continue;
        }
        urw_describe(w, q, bid, (uint32_t)cqe->res, ns);
    }
    io_uring_cq_advance(&w->uring, n);
    uint32_t moved = 0;
    for (uint32_t i = 0; i < w->n_rings; i++) {
        struct urw_ring *q = &w->ring[i];
        if (q->n == 0)
            continue;
        dp_ring_submit(&q->p, q->n);
        q->r->c.rx_packets += q->n;
        q->r->c.rx_bytes += q->bytes;
        q->r->c.bursts++;
        moved += q->n;
        q->n = 0;
        q->bytes = 0;
    }
    return moved ? moved : 1;   /* completions without packets still moved the loop */
}

/* One burst of stream i when its token bucket allows: build, sendmmsg, count. */
static uint32_t urw_gen_stream(struct urw *w, uint32_t i, uint64_t now_ns)
{
    const struct dp_gen_config *gc = &w->cfg->gen;
    uint32_t n = dp_gen_due(&w->gs, gc, i, now_ns);
    if (n == 0)
        return 0;
    struct dp_port_counters *pc = &w->a->port[gc->port];
    struct dp_gen_stream_ctl *sc = &w->a->gen[i];
    uint64_t ns = dp_real_ns();
    for (uint32_t j = 0; j < n; j++)   /* the buffers have room for the largest frame */
        w->iov[j].iov_len = dp_gen_fill(&w->gs, gc, i, w->txbuf + (size_t)j * w->gen_room, sc,
                                        ns);
    int k = sendmmsg(w->gen_fd, w->msgs, n, MSG_DONTWAIT);
    if (k < 0)
        k = 0;   /* ENOBUFS/EAGAIN: the device or qdisc took none of them */
    uint64_t bytes = 0;
    for (int j = 0; j < k; j++)
        bytes += w->iov[j].iov_len;
    /* every sequence number is issued once, taken or not: issued = tx_packets + tx_drops */
    pc->tx_drops += n - (uint32_t)k;
    sc->tx_drops += n - (uint32_t)k;
    pc->gen_seq += n;
    pc->tx_packets += (uint32_t)k;
    pc->tx_bytes += bytes;
    sc->tx_packets += (uint32_t)k;
    sc->tx_bytes += bytes;
    if (dp_gen_took(&w->gs, gc, i, (uint32_t)k))
        w->gen_on = 0;
    return (uint32_t)k;
}

/* Every stream that still has packets to send, one burst each. */
static uint32_t urw_gen(struct urw *w, uint64_t now_ns)
{
    uint32_t moved = 0;
    for (uint32_t i = 0; i < w->gs.n && w->gen_on; i++)
        if (!w->gs.s[i].done)
            moved += urw_gen_stream(w, i, now_ns);
    return moved;
}

/* A ring whose consumer index was impossible (dp_ring.h) stops the worker: 0, or -1 with the
 * error recorded.  Checked with the periodic work: until then the ring only drops. */
static int urw_check_rings(struct urw *w)
{
    for (uint32_t i = 0; i < w->n_rings; i++)
        if (w->ring[i].p.fault)
            return dp_worker_ring_fault(w->a, w->cfg, "uring", i, &w->ring[i].p);
    return 0;
}

/* Until stopped (0), or until a ring's consumer index is impossible (-1, recorded). */
static int urw_loop(struct urw *w)
{
    int rc = 0;
    struct dp_arena *a = w->a;
    uint64_t prev = cycles(), loops = 0, busy = 0, total = 0;
    uint64_t t = dp_mono_ns(), next_tick = t, last_move = t;
    uint32_t moved = 0, reaped = 0;
    while (!__atomic_load_n(&a->stop, __ATOMIC_RELAXED)) {
        uint64_t now = cycles();
        total += now - prev;
        if (moved)
            busy += now - prev;
        prev = now;
        t = dp_mono_ns();
        if (moved)
            last_move = t;
        loops++;
        moved = 0;
        for (uint32_t i = 0; i < w->n_rings; i++) {
            urw_reclaim(w, &w->ring[i]);
            if (!w->ring[i].armed)
                urw_arm(w, &w->ring[i], i);
        }
        if (w->gen_on)
            moved += urw_gen(w, t);
        /* submit what is queued and run the deferred completion work: one syscall a loop */
        io_uring_submit_and_get_events(&w->uring);
        reaped = urw_reap(w);
        moved += reaped;
        if (t >= next_tick) {   /* periodic work, ~every 10 ms */
            next_tick = t + 10000000ull;
            a->loops += loops;
            a->busy_cycles += busy;
            a->total_cycles += total;
            loops = busy = total = 0;
            dp_heartbeat(&a->heartbeat_ns);
            urw_sock_drops(w);
            if (w->gen_on)
                dp_gen_tick(&w->gs, a->gen);   /* a rate Python changed */
            if ((rc = urw_check_rings(w)) < 0)
                break;
        }
        /* idle: wait for a completion (or the nap's end) in the kernel instead of spinning */
        if (!moved && w->cfg->idle_sleep_us && t - last_move > 1000000ull) {
            struct __kernel_timespec ts = { .tv_sec = w->cfg->idle_sleep_us / 1000000,
                                            .tv_nsec = (w->cfg->idle_sleep_us % 1000000) *
                                                       1000ll };
            struct io_uring_cqe *cqe;
            io_uring_wait_cqe_timeout(&w->uring, &cqe, &ts);
        } else if (reaped < w->cfg->burst && !w->gen_on && w->cfg->idle_sleep_us) {
            /* a partial batch: let the next one fill */
            usleep(w->cfg->idle_sleep_us < URW_NAP_US ? w->cfg->idle_sleep_us : URW_NAP_US);
        }
    }
    a->loops += loops;
    a->busy_cycles += busy;
    a->total_cycles += total;
    return rc;
}

int dp_uring_worker_run(void *arena_base, const struct dp_worker_config *cfg)
{
    static struct urw w;   /* DP_MAX_RINGS rings of private state; one worker per process */
    memset(&w, 0, sizeof(w));
    w.base = arena_base;
    w.a = arena_base;
    w.cfg = cfg;
    w.gen_fd = -1;
    w.a->error[0] = '\0';
    if (urw_setup(&w) < 0 || urw_gen_setup(&w) < 0) {
        urw_close(&w);
        return -1;
    }
    __atomic_store_n(&w.a->state, DP_W_RUNNING, __ATOMIC_RELEASE);
    int rc = urw_loop(&w);
    urw_close(&w);
    if (rc < 0)
        return -1;   /* failed, the reason in the arena's error */
    __atomic_store_n(&w.a->state, DP_W_STOPPED, __ATOMIC_RELEASE);
    return 0;
}
