/* transport_recv.c: the receiving end of the TCP transport.  The wire format is in
 * dp_transport.h; the sender is transport_send.c, the helpers both share transport_common.c.
 *
 * The receiver serves one sender at a time.  A new connection replaces the current one (a
 * sender that reconnects after a failure the receiver has not noticed yet must not wait behind
 * a dead socket).  Per frame: read and check the header (magic, version, header_len, count,
 * payload_len against the ring and slot sizes), read the descriptors and check every len and
 * their sum, reserve ring positions, read the bytes straight into those positions' slots (the
 * kernel's copy out of the socket is the only one), publish, acknowledge.
 *
 * A full ring WAITS (counted in ring_waits): the sender is a ring consumer, not a NIC, so the
 * wait becomes TCP backpressure, the sender's ring fills, and the worker feeding it drops and
 * counts (docs/design.md, invariant 2) where the loss is visible.  Dropping here would lose
 * batches the
 * sender has already been told nothing about.
 *
 * A bad header or bad descriptors: log (with the peer), count bad_frames, close, keep
 * listening.  A peer gone mid-frame: log, count short_reads, close.  Nothing is published from
 * a frame that did not arrive whole.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "dp_common.h"
#include "dp_transport.h"

static int stopping(const struct dp_transport *t)
{
    return __atomic_load_n(&t->stop, __ATOMIC_RELAXED) != 0;
}

/* -- receiver -- */

struct rx {
    struct dp_t_end e;
    struct dp_prod p;
    int lfd;
    char peer[64];
    struct dp_desc d[DP_TW_MAX_BATCH];
    struct iovec iov[DP_TW_MAX_BATCH];
};

static void rx_beat(struct rx *x)
{
    dp_heartbeat(&x->e.t->heartbeat_ns);
    x->e.a->heartbeat_ns = x->e.t->heartbeat_ns;   /* the arena looks like a running worker too */
}

static void rx_close(struct rx *x, const char *why)
{
    if (x->e.fd < 0)
        return;
    dp_t_log(x->e.cfg, "connection from %s closed: %s", x->peer, why);
    close(x->e.fd);
    x->e.fd = -1;
    x->e.t->connected = 0;
    x->e.t->c.disconnects++;
}

static int rx_send_msg(struct rx *x, uint16_t type, uint64_t seq, uint64_t session)
{
    struct dp_tw_msg m = { DP_TW_ACK_MAGIC, DP_TW_VERSION, type, seq, session };
    return send(x->e.fd, &m, sizeof(m), MSG_NOSIGNAL) == (ssize_t)sizeof(m) ? 0 : -1;
}

static void rx_accept(struct rx *x)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    int fd = accept4(x->lfd, (struct sockaddr *)&sa, &sl, SOCK_CLOEXEC);
    if (fd < 0)
        return;
    rx_close(x, "replaced by a new connection");
    x->e.fd = fd;
    snprintf(x->peer, sizeof(x->peer), "%s:%u", inet_ntoa(sa.sin_addr), ntohs(sa.sin_port));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));   /* acks are tiny */
    struct timeval tv = { 0, 20000 };     /* reads wake every 20 ms to look at stop/listen */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (x->e.t->c.last_session || x->e.t->connected || x->e.t->c.disconnects)
        x->e.t->c.reconnects++;
    x->e.t->connected = 1;
    dp_t_log(x->e.cfg, "connection from %s (last published: session %llx seq %llu)", x->peer,
             (unsigned long long)x->e.t->c.last_session, (unsigned long long)x->e.t->c.last_seq);
    if (rx_send_msg(x, DP_TW_HELLO, x->e.t->c.last_seq, x->e.t->c.last_session) < 0)
        rx_close(x, "cannot send hello");
}

static int listen_pending(int lfd)
{
    struct pollfd pf = { lfd, POLLIN, 0 };
    return poll(&pf, 1, 0) > 0;
}

/* Read exactly the iovecs' bytes.  1 done; 0 nothing read (EOF: errno 0, an error, or
 * ECANCELED: stop or a new connection waiting); -1 the same after some bytes. */
static int rx_read(struct rx *x, struct iovec *iov, int n, uint64_t *got_out)
{
    uint64_t got = 0;
    while (n > 0) {
        ssize_t k = readv(x->e.fd, iov, n > 1024 ? 1024 : n);
        if (k > 0) {
            got += (uint64_t)k;
            dp_t_iov_advance(&iov, &n, (size_t)k);
            continue;
        }
        if (k == 0) {
            *got_out = got;
            errno = 0;
            return got ? -1 : 0;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            *got_out = got;
            return got ? -1 : 0;
        }
        rx_beat(x);
        if (stopping(x->e.t) || listen_pending(x->lfd)) {
            *got_out = got;
            errno = ECANCELED;
            return got ? -1 : 0;
        }
    }
    *got_out = got;
    return 1;
}

static const char *rx_check_header(const struct rx *x, const struct dp_tw_frame *h)
{
    if (h->magic != DP_TW_MAGIC)
        return "bad magic";
    if (h->version != DP_TW_VERSION)
        return "unsupported version";
    if (h->header_len != sizeof(*h))
        return "bad header_len";
    if (h->count == 0 || h->count > DP_TW_MAX_BATCH || h->count > x->e.r->size)
        return "count out of range";
    if ((uint64_t)h->payload_len > (uint64_t)h->count * x->e.a->slot_size)
        return "payload_len larger than count slots";
    if (h->session == x->e.t->c.last_session && h->batch_seq <= x->e.t->c.last_seq)
        return "batch_seq did not move forward";
    return NULL;
}

/* The descriptors read into x->d for header h: each fits a slot, their lengths sum to the
 * payload.  NULL when they do, else what is wrong (written into why). */
static const char *rx_check_descs(const struct rx *x, const struct dp_tw_frame *h, char *why,
                                  size_t n)
{
    uint64_t sum = 0;
    for (uint32_t i = 0; i < h->count; i++) {
        if (x->d[i].len > x->e.a->slot_size) {
            snprintf(why, n, "descriptor %u len %u > slot size %u", i, x->d[i].len,
                     x->e.a->slot_size);
            return why;
        }
        sum += x->d[i].len;
    }
    if (sum != h->payload_len) {
        snprintf(why, n, "descriptor lengths sum to %llu, header says %u",
                 (unsigned long long)sum, h->payload_len);
        return why;
    }
    return NULL;
}

/* The frames are in their slots: write the descriptors, publish them, count the batch. */
static void rx_publish(struct rx *x, const struct dp_tw_frame *h)
{
    uint64_t rx_ns = dp_real_ns();
    for (uint32_t i = 0; i < h->count; i++) {
        struct dp_desc *d = dp_ring_at(x->e.r, x->p.prod + i);
        *d = x->d[i];
        d->addr = dp_ring_slot(x->e.a, x->e.r, x->p.prod + i);
        d->rx_ns = rx_ns;
        d->port = x->e.cfg->port_index;
        d->queue = (uint8_t)x->e.r->queue;
        d->flags |= DP_F_COPIED;
    }
    dp_ring_submit(&x->p, h->count);
    struct dp_ring_counters *rc = &x->e.r->c;
    rc->rx_packets += h->count;
    rc->rx_bytes += h->payload_len;
    rc->copied += h->count;
    rc->bursts++;
    x->e.t->c.batches++;
    x->e.t->c.packets += h->count;
    x->e.t->c.bytes += h->payload_len;
    x->e.t->c.last_session = h->session;
    x->e.t->c.last_seq = h->batch_seq;
}

/* One frame.  0 on success, -1 when the connection was closed (logged, counted). */
static int rx_frame(struct rx *x)
{
    struct dp_tw_frame h;
    struct iovec v = { &h, sizeof(h) };
    uint64_t got;
    char why[192];
    int rc = rx_read(x, &v, 1, &got);
    if (rc == 0) {   /* between frames: not a short read */
        if (errno != ECANCELED)
            rx_close(x, errno ? strerror(errno) : "peer closed");
        return -1;
    }
    if (rc < 0)
        goto short_read;
    const char *bad = rx_check_header(x, &h);
    if (bad) {
        snprintf(why, sizeof(why), "%s (magic %08x version %u header_len %u count %u "
                 "payload_len %u)", bad, h.magic, h.version, h.header_len, h.count,
                 h.payload_len);
        goto bad_frame;
    }
    v.iov_base = x->d;
    v.iov_len = h.count * sizeof(struct dp_desc);
    if (rx_read(x, &v, 1, &got) != 1)
        goto short_read;
    if (rx_check_descs(x, &h, why, sizeof(why)))
        goto bad_frame;
    if (dp_ring_reserve(&x->p, h.count) < h.count) {
        x->e.t->c.ring_waits++;
        while (dp_ring_reserve(&x->p, h.count) < h.count) {
            if (stopping(x->e.t))
                return -1;
            rx_beat(x);
            usleep(50);
        }
    }
    int n = 0;
    for (uint32_t i = 0; i < h.count; i++) {
        if (x->d[i].len == 0)
            continue;
        uint64_t off = dp_ring_slot(x->e.a, x->e.r, x->p.prod + i);
        x->iov[n].iov_base = (char *)x->e.a + off;
        x->iov[n++].iov_len = x->d[i].len;
    }
    if (n && rx_read(x, x->iov, n, &got) != 1)
        goto short_read;
    rx_publish(x, &h);
    if (rx_send_msg(x, DP_TW_ACK, h.batch_seq, h.session) < 0) {
        rx_close(x, "cannot send ack (peer gone)");
        return -1;
    }
    x->e.t->c.acks++;
    return 0;

bad_frame:
    x->e.t->c.bad_frames++;
    dp_t_log(x->e.cfg, "bad frame from %s: %s", x->peer, why);
    rx_close(x, "bad frame");
    return -1;

short_read:
    if (errno == ECANCELED) {
        if (!stopping(x->e.t)) {
            x->e.t->c.short_reads++;
            rx_close(x, "abandoned mid-frame for a new connection");
        }
        return -1;
    }
    x->e.t->c.short_reads++;
    dp_t_log(x->e.cfg, "short read from %s: connection ended mid-frame (%s)", x->peer,
             errno ? strerror(errno) : "EOF");
    rx_close(x, "short read");
    return -1;
}

static int rx_listen(struct rx *x)
{
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(x->e.cfg->tcp_port) };
    if (inet_pton(AF_INET, x->e.cfg->host, &sa.sin_addr) != 1)
        return dp_t_fail(x->e.t, "listen address %s is not an IPv4 address", x->e.cfg->host);
    x->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(x->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(x->lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(x->lfd, 8) < 0) {
        int e = errno;
        close(x->lfd);
        return dp_t_fail(x->e.t, "listen on %s:%u: %s", x->e.cfg->host, x->e.cfg->tcp_port,
                         strerror(e));
    }
    return 0;
}

int dp_transport_recv_run(void *arena_base, uint32_t ring, struct dp_transport *t,
                          const struct dp_transport_config *cfg)
{
    static struct rx x;   /* 64 KB of scratch: one receiver per process */
    memset(&x, 0, sizeof(x));
    if (dp_t_start(&x.e, arena_base, ring, t, cfg) < 0)
        return -1;
    x.e.a->pid = t->pid;   /* the arena looks like a running worker's too */
    dp_prod_init(&x.p, x.e.r);
    if (rx_listen(&x) < 0)
        return -1;
    dp_t_log(cfg, "listening on %s:%u", cfg->host, cfg->tcp_port);
    rx_beat(&x);
    __atomic_store_n(&t->state, DP_W_RUNNING, __ATOMIC_RELEASE);
    x.e.a->state = DP_W_RUNNING;
    while (!stopping(t)) {
        rx_beat(&x);
        if (x.e.fd < 0 || listen_pending(x.lfd)) {
            struct pollfd pf = { x.lfd, POLLIN, 0 };
            if (poll(&pf, 1, 10) > 0)
                rx_accept(&x);
            continue;
        }
        rx_frame(&x);
    }
    rx_close(&x, "stopping");
    close(x.lfd);
    x.e.a->state = DP_W_STOPPED;
    __atomic_store_n(&t->state, DP_W_STOPPED, __ATOMIC_RELEASE);
    return 0;
}
