/* kernel_drops.c: drops inside the kernel sockets of af_packet and af_xdp ports, which DPDK
 * 22.11 does not report, so that every lost packet shows up in a counter of ours.
 *
 * Measured on a veth lab (receiver stopped for 1 s at 20 kpps): af_packet lost ~19k frames in
 * its TPACKET ring and imissed stayed 0 (the PMD never reads PACKET_STATISTICS); af_xdp lost
 * ~19k in the full XSK RX ring and imissed stayed 0 (the PMD reports XDP_STATISTICS rx_dropped,
 * not rx_ring_full).  The sockets are the PMDs' own, but they are fds of this process: find
 * them once after the ports start, match them to ports by ifindex, and read them every tick.
 */
#include <dirent.h>
#include <linux/if_packet.h>
#include <linux/if_xdp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "dp_dpdk.h"

#ifndef SOL_XDP
#define SOL_XDP 283
#endif

/* The port an af_packet socket is bound to, by ifindex.  XSK sockets implement no
 * getsockname(): they go to the worker's one af_xdp port; with several, telling them apart
 * would need XDP_DIAG, so they are left out and the limitation is printed. */
static int ksock_port(struct dpw *w, int fd, int domain)
{
    int found = -1;
    struct sockaddr_ll ll;
    socklen_t len = sizeof(ll);
    if (domain == AF_PACKET && getsockname(fd, (struct sockaddr *)&ll, &len) < 0)
        return -1;
    for (uint32_t p = 0; p < w->cfg->n_ports; p++) {
        struct rte_eth_dev_info info;
        if (!w->started[p] || rte_eth_dev_info_get(w->port_id[p], &info) != 0)
            continue;
        if (domain == AF_PACKET && ll.sll_ifindex > 0 && (int)info.if_index == ll.sll_ifindex)
            return (int)p;
        if (domain == AF_XDP && strstr(info.driver_name, "af_xdp") != NULL) {
            if (found >= 0) {
                fprintf(stderr, "dataplane: several af_xdp ports in one worker: their XSK ring-"
                        "full drops are not counted (one af_xdp port per worker counts them)\n");
                return -1;
            }
            found = (int)p;
        }
    }
    return found;
}

void dpw_ksock_find(struct dpw *w)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && w->n_ksock < DPW_MAX_KSOCK) {
        int fd = atoi(e->d_name), domain, port;
        socklen_t len = sizeof(domain);
        if (fd <= 2 || fd == dirfd(d) ||
            getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0 ||
            (domain != AF_PACKET && domain != AF_XDP) || (port = ksock_port(w, fd, domain)) < 0)
            continue;
        w->ksock[w->n_ksock++] = (struct dpw_ksock){ .fd = fd, .domain = domain,
                                                     .port = (uint16_t)port };
    }
    closedir(d);
    /* no baseline: these sockets are this worker's own, so all they ever dropped is ours */
}

void dpw_ksock_drops(struct dpw *w)
{
    for (uint32_t i = 0; i < w->n_ksock; i++) {
        struct dpw_ksock *k = &w->ksock[i];
        uint64_t add = 0;
        if (k->domain == AF_PACKET) {
            struct tpacket_stats_v3 st;   /* reading resets it: what we read is new */
            socklen_t len = sizeof(st);
            if (getsockopt(k->fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) == 0)
                add = st.tp_drops;
        } else {
            struct xdp_statistics st;
            socklen_t len = sizeof(st);
            if (getsockopt(k->fd, SOL_XDP, XDP_STATISTICS, &st, &len) == 0 &&
                st.rx_ring_full >= k->last) {
                add = st.rx_ring_full - k->last;
                k->last = st.rx_ring_full;
            }
        }
        w->a->port[k->port].nic_missed += add;
    }
}
