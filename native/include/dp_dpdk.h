/* dp_dpdk.h: the DPDK worker (native/dpdk/, the extension dataplane._dpdk): its entry point,
 * and its private state, shared by dpdk_port.c (set-up, stats, close) and dpdk_worker.c (the
 * loops).  Not part of the arena contract: nothing outside the DPDK worker includes it. */
#ifndef DP_DPDK_H
#define DP_DPDK_H

#include <rte_ethdev.h>
#include <rte_mbuf.h>

#include "dp_common.h"

#define DPW_MAX_BURST DP_MAX_BURST

/* Worker-private state of one ring. */
struct dpw_ring {
    struct dp_ring *r;
    struct dp_prod p;
    uint64_t freed;            /* zero copy: shadow[] freed up to this ring index */
    struct rte_mbuf **shadow;  /* zero copy: the mbuf behind each ring position */
    uint16_t port_id;          /* DPDK port id */
    uint16_t port, queue;      /* worker-local port index, RX queue */
};

/* A kernel socket behind an af_packet or af_xdp port (kernel_drops.c). */
#define DPW_MAX_KSOCK 16
struct dpw_ksock {
    int fd, domain;
    uint16_t port;
    uint64_t last;      /* af_xdp: rx_ring_full already counted (it is a running total) */
};

struct dpw {
    char *base;
    struct dp_arena *a;
    const struct dp_worker_config *cfg;
    int eal_up;
    int zero_copy;
    struct rte_mempool *pool;
    uint16_t port_id[DP_MAX_PORTS];
    uint8_t started[DP_MAX_PORTS];
    struct rte_eth_stats last[DP_MAX_PORTS];   /* NIC stats already added to the arena */
    uint32_t n_rings;
    struct dpw_ring ring[DP_MAX_RINGS];
    uint32_t n_ksock;
    struct dpw_ksock ksock[DPW_MAX_KSOCK];
};

/* cffi: begin */
/* The data room of the pool's mbufs (RTE_MBUF_DEFAULT_BUF_SIZE, dpdk_port.c): the longest
 * frame a zero-copy descriptor can point at, so what a consumer of its slots must hold. */
#define DPW_MBUF_DATAROOM RTE_MBUF_DEFAULT_DATAROOM
/* Run a DPDK worker until arena->stop is set.  Returns 0, or -1 with arena->error filled. */
int dp_dpdk_worker_run(void *arena_base, const struct dp_worker_config *cfg);
/* cffi: end */

#define dpw_fail(w, ...) dp_worker_fail((w)->a, (w)->cfg, "dpdk", __VA_ARGS__)

/* dpdk_port.c */
int  dpw_setup(struct dpw *w);
void dpw_nic_stats(struct dpw *w);
void dpw_close(struct dpw *w);

/* kernel_drops.c */
void dpw_ksock_find(struct dpw *w);
void dpw_ksock_drops(struct dpw *w);

/* intr_guard.c: the EAL's interrupt callbacks (a PMD's control path) wait while the loop is
 * inside its bursts, and the loop skips its bursts while one runs. */
extern int dpw_guard_in_burst, dpw_guard_paused;
int dpw_guard_active(void);

/* Enter the bursts: 1, or 0 when a callback runs (then the loop does not touch the ports). */
static inline int dpw_guard_enter(void)
{
    __atomic_store_n(&dpw_guard_in_burst, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&dpw_guard_paused, __ATOMIC_SEQ_CST))
        return 1;
    __atomic_store_n(&dpw_guard_in_burst, 0, __ATOMIC_RELEASE);
    return 0;
}

static inline void dpw_guard_leave(void)
{
    __atomic_store_n(&dpw_guard_in_burst, 0, __ATOMIC_RELEASE);
}

#endif
