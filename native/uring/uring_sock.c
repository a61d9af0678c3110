/* uring_sock.c: set-up and tear-down of the io_uring worker: the ring, one socket per arena
 * ring (AF_PACKET in a fanout, or UDP with SO_REUSEPORT), one provided-buffer ring per socket
 * whose buffers are that ring's arena slots, the generator's TX socket, and the sockets' own
 * drop counters folded into the port's nic_missed.
 *
 * Set-up fails fast like dpdk_port.c: the call, errno's text and the port go into
 * arena->error, the state becomes DP_W_FAILED and the caller gets -1. */
#define _GNU_SOURCE   /* sendmmsg, struct mmsghdr */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/sock_diag.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dp_uring.h"

#define URW_RCVBUF (4 << 20)   /* socket backlog while every slot is held (ENOBUFS) */

/* Hand one slot back to the kernel; visible to it after io_uring_buf_ring_advance. */
void urw_give_back(struct urw *w, struct urw_ring *q, uint16_t bid, uint32_t n_advance)
{
    /* the worker's private geometry (dp_prod_slot): the kernel writes where we say */
    io_uring_buf_ring_add(q->br, w->base + dp_prod_slot(&q->p, bid),
                          q->p.slot_size, bid, io_uring_buf_ring_mask(q->p.size),
                          (int)n_advance);
}

/* AF_PACKET, ETH_P_ALL, bound to the interface; incoming frames only (our generator's and
 * other local senders' frames are not ingest).  Several queues: one PACKET_FANOUT_HASH group
 * per port, so a flow stays on one ring. */
static int urw_raw_socket(struct urw *w, struct urw_ring *q, const struct dp_port_config *pc)
{
    unsigned ifindex = if_nametoindex(pc->iface);
    if (ifindex == 0)
        return urw_fail(w, "port %u: interface \"%s\": %s", q->port, pc->iface, strerror(errno));
    /* protocol 0 until bound: nothing arrives from other interfaces in between */
    q->fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (q->fd < 0)
        return urw_fail(w, "port %u: socket(AF_PACKET): %s", q->port, strerror(errno));
    int one = 1;
    if (setsockopt(q->fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one)) < 0)
        return urw_fail(w, "port %u: PACKET_IGNORE_OUTGOING: %s", q->port, strerror(errno));
    struct sockaddr_ll ll = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                              .sll_ifindex = (int)ifindex };
    if (bind(q->fd, (struct sockaddr *)&ll, sizeof(ll)) < 0)
        return urw_fail(w, "port %u: bind to %s: %s", q->port, pc->iface, strerror(errno));
    if (pc->n_rxq > 1) {
        int fanout = (int)(((unsigned)getpid() * DP_MAX_PORTS + q->port) & 0xffff) |
                     (PACKET_FANOUT_HASH << 16);
        if (setsockopt(q->fd, SOL_PACKET, PACKET_FANOUT, &fanout, sizeof(fanout)) < 0)
            return urw_fail(w, "port %u queue %u: PACKET_FANOUT: %s", q->port, q->queue,
                            strerror(errno));
    }
    return 0;
}

/* UDP on the configured port, any address; several queues share it with SO_REUSEPORT. */
static int urw_udp_socket(struct urw *w, struct urw_ring *q, const struct dp_port_config *pc)
{
    q->fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (q->fd < 0)
        return urw_fail(w, "port %u: socket(UDP): %s", q->port, strerror(errno));
    int one = 1;
    if (pc->n_rxq > 1 && setsockopt(q->fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
        return urw_fail(w, "port %u: SO_REUSEPORT: %s", q->port, strerror(errno));
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(pc->udp_port),
                               .sin_addr.s_addr = htonl(INADDR_ANY) };
    if (bind(q->fd, (struct sockaddr *)&sin, sizeof(sin)) < 0)
        return urw_fail(w, "port %u: bind UDP port %u: %s", q->port, pc->udp_port,
                        strerror(errno));
    return 0;
}

/* The provided-buffer ring of one socket: its buffers are the ring's own slots, so the kernel
 * writes each packet straight into the arena.  Every slot starts with the kernel. */
static int urw_buffers(struct urw *w, struct urw_ring *q, uint32_t i)
{
    uint32_t n = q->p.size;
    q->br_len = (n * sizeof(struct io_uring_buf) + 4095) & ~(size_t)4095;
    void *mem = mmap(NULL, q->br_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (mem == MAP_FAILED)
        return urw_fail(w, "ring %u: mmap of the buffer ring: %s", i, strerror(errno));
    q->br = mem;
    struct io_uring_buf_reg reg = { .ring_addr = (uint64_t)(uintptr_t)mem, .ring_entries = n,
                                    .bgid = (uint16_t)i };
    int rc = io_uring_register_buf_ring(&w->uring, &reg, 0);
    if (rc < 0)
        return urw_fail(w, "ring %u: io_uring_register_buf_ring(%u entries): %s", i, n,
                        strerror(-rc));
    q->registered = 1;
    io_uring_buf_ring_init(q->br);
    q->bid = calloc(n, sizeof(*q->bid));
    if (q->bid == NULL)
        return urw_fail(w, "ring %u: calloc of the buffer ids failed", i);
    for (uint32_t b = 0; b < n; b++)
        io_uring_buf_ring_add(q->br, w->base + dp_prod_slot(&q->p, b), q->p.slot_size,
                              (uint16_t)b, io_uring_buf_ring_mask(n), (int)b);
    io_uring_buf_ring_advance(q->br, (int)n);
    return 0;
}

int urw_setup(struct urw *w)
{
    const struct dp_worker_config *cfg = w->cfg;
    struct dp_prod prod[DP_MAX_RINGS];
    w->a->zero_copy = 0;   /* descriptors point at slots, not at a NIC's buffers */
    /* URW_MAX_BUFS: the kernel's limit on the buffers of one provided-buffer ring */
    if (dp_worker_attach(w->a, cfg, "uring", URW_MAX_BURST, URW_MAX_BUFS, prod) < 0)
        return -1;
    w->n_rings = w->a->n_rings;
    for (uint32_t i = 0; i < w->n_rings; i++) {
        struct urw_ring *q = &w->ring[i];
        q->r = prod[i].r;
        q->p = prod[i];
        q->fd = -1;
        q->uc = &w->a->uring[i];
        q->returned = q->p.prod;
        q->port = q->r->port;
        q->queue = q->r->queue;
    }
    /* CQ room for a good burst per ring: multishot posts one CQE per packet */
    /* DEFER_TASKRUN: the receives' completion work runs when this thread asks for events
     * (once per loop, batched) instead of interrupting it while it polls; without it a
     * busy-polling worker was interrupted per completion batch (measured ~4x the CPU per
     * packet).  SINGLE_ISSUER holds: set-up and loop run on one thread.  Linux 6.1+: older
     * kernels refuse the flags, and the ring is set up without them. */
    struct io_uring_params par = { .flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER |
                                            IORING_SETUP_DEFER_TASKRUN, .cq_entries = 8192 };
    int rc = io_uring_queue_init_params(256, &w->uring, &par);
    if (rc == -EINVAL) {
        struct io_uring_params plain = { .flags = IORING_SETUP_CQSIZE, .cq_entries = 8192 };
        rc = io_uring_queue_init_params(256, &w->uring, &plain);
    }
    if (rc < 0)
        return urw_fail(w, "io_uring_queue_init: %s", strerror(-rc));
    w->uring_up = 1;
    for (uint32_t i = 0; i < w->n_rings; i++) {
        struct urw_ring *q = &w->ring[i];
        const struct dp_port_config *pc = &cfg->port[q->port];
        q->kind = pc->udp_port ? URW_UDP : URW_RAW;
        if (q->kind == URW_RAW && pc->iface[0] == '\0')
            return urw_fail(w, "port %u (%s): neither an interface nor a UDP port", q->port,
                            pc->name);
        if ((q->kind == URW_RAW ? urw_raw_socket(w, q, pc) : urw_udp_socket(w, q, pc)) < 0)
            return -1;
        int sz = URW_RCVBUF;
        if (setsockopt(q->fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof(sz)) < 0)
            (void)setsockopt(q->fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
        if (urw_buffers(w, q, i) < 0)
            return -1;
    }
    return 0;
}

/* The generator sends on its own AF_PACKET socket on the gen port's interface, bound with
 * protocol 0 so it receives nothing; the RX sockets ignore outgoing frames, so the generator's
 * frames are never ingested by the worker that sends them. */
int urw_gen_setup(struct urw *w)
{
    const struct dp_gen_config *gc = &w->cfg->gen;
    if (!gc->enabled)
        return 0;
    if (gc->port >= w->cfg->n_ports || w->cfg->port[gc->port].udp_port ||
        w->cfg->port[gc->port].iface[0] == '\0')
        return urw_fail(w, "generator: port %u is not an af_packet port of this worker",
                        gc->port);
    char why[DP_ERR_LEN];
    if (dp_gen_prepare(&w->gs, gc, w->a->gen, DP_TMPL_MAX, URW_MAX_BURST, 1000000000ull,
                       dp_mono_ns(), why, sizeof(why)) < 0)
        return urw_fail(w, "%s", why);
    const char *ifn = w->cfg->port[gc->port].iface;
    unsigned ifindex = if_nametoindex(ifn);
    w->gen_fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (ifindex == 0 || w->gen_fd < 0)
        return urw_fail(w, "generator: AF_PACKET socket on \"%s\": %s", ifn, strerror(errno));
    struct sockaddr_ll *ll = (struct sockaddr_ll *)&w->gen_to;
    ll->sll_family = AF_PACKET;
    ll->sll_ifindex = (int)ifindex;
    memcpy(&ll->sll_protocol, gc->s[0].tmpl + 12, 2);   /* the first stream's ethertype */
    if (bind(w->gen_fd, (struct sockaddr *)ll, sizeof(*ll)) < 0 && errno != EINVAL)
        return urw_fail(w, "generator: bind to %s: %s", ifn, strerror(errno));
    uint32_t n = w->gs.burst;
    w->gen_room = 0;   /* one buffer per frame of a burst, as long as the longest template */
    for (uint32_t i = 0; i < w->gs.n; i++)
        w->gen_room = w->gs.s[i].len > w->gen_room ? w->gs.s[i].len : w->gen_room;
    w->txbuf = calloc(n, w->gen_room);
    w->iov = calloc(n, sizeof(*w->iov));
    w->msgs = calloc(n, sizeof(*w->msgs));
    if (!w->txbuf || !w->iov || !w->msgs)
        return urw_fail(w, "generator: calloc of %u frames failed", n);
    for (uint32_t i = 0; i < n; i++) {
        w->iov[i] = (struct iovec){ .iov_base = w->txbuf + (size_t)i * w->gen_room,
                                    .iov_len = w->gen_room };
        w->msgs[i].msg_hdr = (struct msghdr){ .msg_name = ll, .msg_namelen = sizeof(*ll),
                                              .msg_iov = &w->iov[i], .msg_iovlen = 1 };
    }
    w->gen_on = 1;
    return 0;
}

/* Frames the kernel dropped before we saw them: the socket's buffer was full (the consumer
 * held every slot long enough for ENOBUFS to back packets up into it). */
void urw_sock_drops(struct urw *w)
{
    for (uint32_t i = 0; i < w->n_rings; i++) {
        struct urw_ring *q = &w->ring[i];
        uint64_t add = 0;
        if (q->fd < 0)
            continue;
        if (q->kind == URW_RAW) {
            struct tpacket_stats st;   /* reading resets it: what we read is new */
            socklen_t len = sizeof(st);
            if (getsockopt(q->fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) == 0)
                add = st.tp_drops;
        } else {
            uint32_t mi[SK_MEMINFO_VARS];
            socklen_t len = sizeof(mi);
            if (getsockopt(q->fd, SOL_SOCKET, SO_MEMINFO, mi, &len) == 0 &&
                mi[SK_MEMINFO_DROPS] >= q->sk_drops) {
                add = mi[SK_MEMINFO_DROPS] - q->sk_drops;
                q->sk_drops = mi[SK_MEMINFO_DROPS];
            }
        }
        w->a->port[q->port].nic_missed += add;
    }
}

/* Close the ring first: that cancels the multishot receives, so the kernel writes no more into
 * the slots; then the sockets and the private memory. */
void urw_close(struct urw *w)
{
    if (w->uring_up) {
        urw_sock_drops(w);
        io_uring_queue_exit(&w->uring);
        w->uring_up = 0;
    }
    for (uint32_t i = 0; i < w->n_rings; i++) {
        struct urw_ring *q = &w->ring[i];
        if (q->fd >= 0)
            close(q->fd);
        q->fd = -1;
        if (q->br)
            munmap(q->br, q->br_len);
        q->br = NULL;
        free(q->bid);
        q->bid = NULL;
    }
    if (w->gen_fd >= 0)
        close(w->gen_fd);
    free(w->txbuf);
    free(w->iov);
    free(w->msgs);
}
