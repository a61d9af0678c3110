/* dpdk_port.c: set-up and tear-down of the DPDK worker: EAL, the mbuf pool (in the arena when
 * it can be), the ports, and NIC statistics folded into the arena's monotonic counters.
 *
 * Set-up fails fast: the call, rte_errno's text and the port go into arena->error, the state
 * becomes DP_W_FAILED and the caller gets -1.  Nothing here exits the process.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_malloc.h>
#include <rte_vfio.h>

#include "dp_dpdk.h"

#define DPW_HEAP "dp_arena"

static int dpw_eal(struct dpw *w)
{
    /* rte_eal_init permutes argv: give it a private copy of the pointers. */
    char *argv[DP_EAL_ARGS + 1];
    int argc = w->cfg->eal_argc;
    if (argc <= 0 || argc > DP_EAL_ARGS)
        return dpw_fail(w, "eal_argc %d out of range 1..%d", argc, DP_EAL_ARGS);
    for (int i = 0; i < argc; i++)
        argv[i] = (char *)w->cfg->eal_argv[i];
    argv[argc] = NULL;
    if (!dpw_guard_active())   /* the PMDs bind before they run: say it before rte_eal_init */
        fprintf(stderr, "dpdk worker %u: the interrupt guard is not active (extension not "
                "loaded RTLD_GLOBAL): a memif peer leaving can crash this worker\n",
                w->cfg->worker_id);
    if (rte_eal_init(argc, argv) < 0)
        return dpw_fail(w, "rte_eal_init: %s", rte_strerror(rte_errno));
    w->eal_up = 1;
    return 0;
}

/* Zero copy: an external malloc heap over the arena's pool region, the mbuf pool on it.  The
 * region is declared in 2 MB pages whatever backs it: af_xdp sizes its UMEM from the page size
 * and with 4 KB pages receive stops silently after some thousands of packets. */
static const char *dpw_arena_pool(struct dpw *w)
{
    struct dp_arena *a = w->a;
    if (rte_eal_iova_mode() == RTE_IOVA_PA)
        return "IOVA mode is PA (arena memory has no physical addresses): use --iova-mode=va";
    if (a->pool_len < DP_HUGE_PAGE || a->pool_off % DP_HUGE_PAGE ||
        (uintptr_t)(w->base + a->pool_off) % DP_HUGE_PAGE)
        return "arena pool region is not 2 MB aligned (map it with dp_arena_map)";
    if (rte_malloc_heap_create(DPW_HEAP) < 0)
        return "rte_malloc_heap_create failed";
    if (rte_malloc_heap_memory_add(DPW_HEAP, w->base + a->pool_off, a->pool_len, NULL,
                                   (unsigned)(a->pool_len / DP_HUGE_PAGE), DP_HUGE_PAGE) < 0)
        return "rte_malloc_heap_memory_add failed";
    /* A NIC behind vfio reads and writes only what is mapped in its IOMMU, and EAL maps its
     * own memory, not external heaps: without this the NIC DMAs into unmapped addresses and
     * the frames never arrive (seen in the guest: rx counted, bytes wrong).  IOVA = VA. */
    if (rte_vfio_is_enabled("vfio_pci") &&
        rte_vfio_container_dma_map(RTE_VFIO_DEFAULT_CONTAINER_FD,
                                   (uint64_t)(uintptr_t)(w->base + a->pool_off),
                                   (uint64_t)(uintptr_t)(w->base + a->pool_off),
                                   a->pool_len) < 0)
        return "rte_vfio_container_dma_map of the arena pool failed";
    int socket = rte_malloc_heap_get_socket(DPW_HEAP);
    w->pool = rte_pktmbuf_pool_create("dp_arena_pool", w->cfg->n_mbufs, 256, 0,
                                      RTE_MBUF_DEFAULT_BUF_SIZE, socket);
    return w->pool ? NULL : "rte_pktmbuf_pool_create on the arena heap failed (pool_mb too small?)";
}

static int dpw_pool(struct dpw *w)
{
    const char *why = "zero_copy is off in the config";
    rte_errno = 0;
    if (w->cfg->zero_copy && (why = dpw_arena_pool(w)) == NULL) {
        w->zero_copy = 1;
        w->a->zero_copy = 1;
        for (uint32_t i = 0; i < w->n_rings; i++) {
            w->ring[i].shadow = calloc(w->a->ring_size, sizeof(struct rte_mbuf *));
            if (!w->ring[i].shadow)
                return dpw_fail(w, "calloc of the mbuf shadow of ring %u failed", i);
        }
        return 0;
    }
    const char *err = rte_errno ? rte_strerror(rte_errno) : "";
    fprintf(stderr, "dpdk worker %u: copy mode, every frame is copied into a slot: %s%s%s\n",
            w->cfg->worker_id, why, *err ? ": " : "", err);
    w->a->zero_copy = 0;
    w->pool = rte_pktmbuf_pool_create("dp_eal_pool", w->cfg->n_mbufs, 256, 0,
                                      RTE_MBUF_DEFAULT_BUF_SIZE, (int)rte_socket_id());
    if (!w->pool)
        return dpw_fail(w, "rte_pktmbuf_pool_create(%u mbufs) in EAL memory: %s",
                        w->cfg->n_mbufs, rte_strerror(rte_errno));
    return 0;
}

static int dpw_port(struct dpw *w, uint32_t p)
{
    const struct dp_port_config *pc = &w->cfg->port[p];
    uint16_t id;
    if (rte_eth_dev_get_port_by_name(pc->name, &id) != 0)
        return dpw_fail(w, "port %s: no such ethdev (check its --vdev/-a argument)", pc->name);
    w->port_id[p] = id;
    struct rte_eth_dev_info info;
    int ret = rte_eth_dev_info_get(id, &info);
    if (ret != 0)
        return dpw_fail(w, "rte_eth_dev_info_get(port %s): %s", pc->name, rte_strerror(-ret));
    if (pc->n_rxq == 0 || pc->n_rxq > info.max_rx_queues)
        return dpw_fail(w, "port %s: %u RX queues asked, the driver %s offers 1..%u", pc->name,
                        pc->n_rxq, info.driver_name, info.max_rx_queues);
    uint16_t n_txq = pc->n_txq ? pc->n_txq : 1;
    if (n_txq > info.max_tx_queues)
        return dpw_fail(w, "port %s: %u TX queues asked, the driver %s offers at most %u",
                        pc->name, n_txq, info.driver_name, info.max_tx_queues);
    struct rte_eth_conf conf;
    memset(&conf, 0, sizeof(conf));
    uint64_t rss = info.flow_type_rss_offloads & (RTE_ETH_RSS_IP | RTE_ETH_RSS_UDP |
                                                  RTE_ETH_RSS_TCP);
    if (pc->n_rxq > 1 && rss) {
        conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
        conf.rx_adv_conf.rss_conf.rss_hf = rss;
    }
    ret = rte_eth_dev_configure(id, pc->n_rxq, n_txq, &conf);
    if (ret < 0)
        return dpw_fail(w, "rte_eth_dev_configure(port %s, %u rxq, %u txq): %s", pc->name,
                        pc->n_rxq, n_txq, rte_strerror(-ret));
    uint16_t rxd = pc->rxd ? pc->rxd : 1024, txd = pc->txd ? pc->txd : 1024;
    ret = rte_eth_dev_adjust_nb_rx_tx_desc(id, &rxd, &txd);   /* clamps to the driver's limits */
    if (ret < 0)
        return dpw_fail(w, "rte_eth_dev_adjust_nb_rx_tx_desc(port %s): %s", pc->name,
                        rte_strerror(-ret));
    int socket = rte_eth_dev_socket_id(id);
    for (uint16_t q = 0; q < pc->n_rxq; q++) {
        ret = rte_eth_rx_queue_setup(id, q, rxd, socket, NULL, w->pool);
        if (ret < 0)
            return dpw_fail(w, "rte_eth_rx_queue_setup(port %s, queue %u, %u desc): %s",
                            pc->name, q, rxd, rte_strerror(-ret));
    }
    for (uint16_t q = 0; q < n_txq; q++) {
        ret = rte_eth_tx_queue_setup(id, q, txd, socket, NULL);
        if (ret < 0)
            return dpw_fail(w, "rte_eth_tx_queue_setup(port %s, queue %u, %u desc): %s",
                            pc->name, q, txd, rte_strerror(-ret));
    }
    ret = rte_eth_dev_start(id);
    if (ret < 0)
        return dpw_fail(w, "rte_eth_dev_start(port %s): %s", pc->name, rte_strerror(-ret));
    w->started[p] = 1;
    ret = rte_eth_promiscuous_enable(id);
    if (ret < 0 && ret != -ENOTSUP)
        return dpw_fail(w, "rte_eth_promiscuous_enable(port %s): %s", pc->name,
                        rte_strerror(-ret));
    /* NIC counters start from here; only deltas reach the arena (they are never reset). */
    rte_eth_stats_get(id, &w->last[p]);
    return 0;
}

int dpw_setup(struct dpw *w)
{
    const struct dp_worker_config *cfg = w->cfg;
    struct dp_prod prod[DP_MAX_RINGS];
    if (dpw_eal(w) < 0 ||
        dp_worker_attach(w->a, cfg, "dpdk", DPW_MAX_BURST, UINT32_MAX, prod) < 0)
        return -1;
    w->n_rings = w->a->n_rings;
    for (uint32_t i = 0; i < w->n_rings; i++) {
        struct dpw_ring *q = &w->ring[i];
        q->r = prod[i].r;
        q->p = prod[i];
        q->freed = q->p.prod;
        q->port = q->r->port;
        q->queue = q->r->queue;
    }
    if (dpw_pool(w) < 0)
        return -1;
    for (uint32_t p = 0; p < cfg->n_ports; p++)
        if (dpw_port(w, p) < 0)
            return -1;
    for (uint32_t i = 0; i < w->n_rings; i++)
        w->ring[i].port_id = w->port_id[w->ring[i].port];
    dpw_ksock_find(w);
    return 0;
}

/* Add what the NIC counted since the last call to the arena's monotonic port counters. */
void dpw_nic_stats(struct dpw *w)
{
    for (uint32_t p = 0; p < w->cfg->n_ports; p++) {
        struct rte_eth_stats s;
        if (!w->started[p] || rte_eth_stats_get(w->port_id[p], &s) != 0)
            continue;
        struct rte_eth_stats *l = &w->last[p];
        struct dp_port_counters *c = &w->a->port[p];
        /* a driver that resets its counters would make a delta negative: skip that one */
        if (s.imissed >= l->imissed)
            c->nic_missed += s.imissed - l->imissed;
        if (s.ierrors + s.oerrors >= l->ierrors + l->oerrors)
            c->nic_errors += (s.ierrors + s.oerrors) - (l->ierrors + l->oerrors);
        if (s.rx_nombuf >= l->rx_nombuf)
            c->rx_nombuf += s.rx_nombuf - l->rx_nombuf;
        *l = s;
    }
    dpw_ksock_drops(w);
}

/* Stop and close the ports: af_xdp detaches its XDP program, memif and af_packet close their
 * sockets.  The arena pool is not freed: DPDK's free zeroes memory, and the consumer may still
 * be reading frames in it; the next worker on this arena waits for the rings to drain before it
 * reuses the region.
 *
 * rte_eal_cleanup() is deliberately not called: in 22.11 it unmaps EAL memory while the
 * interrupt thread may still walk its sources (a memif server stopping with its client still
 * connected crashed in rte_intr_fd_get, about 1 stop in 40 under load).  The process exits right
 * after this; dataplane/workers/process.py runs EAL with --huge-unlink and removes the runtime
 * directory, so nothing is left behind. */
void dpw_close(struct dpw *w)
{
    if (w->eal_up)
        dpw_nic_stats(w);
    for (uint32_t p = 0; p < w->cfg->n_ports && p < DP_MAX_PORTS; p++) {
        if (!w->started[p])
            continue;
        rte_eth_dev_stop(w->port_id[p]);
        rte_eth_dev_close(w->port_id[p]);
        w->started[p] = 0;
    }
    for (uint32_t i = 0; i < w->n_rings; i++) {
        free(w->ring[i].shadow);
        w->ring[i].shadow = NULL;
    }
    w->eal_up = 0;
}
