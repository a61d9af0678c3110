/* transport_send.c: the sending end of the TCP transport.  Consumes one ring of a local arena
 * and ships each batch as one frame (dp_transport.h) without copying it in user space: the
 * iovecs point at the ring's descriptors and at the frames where they lie in the arena.
 *
 * A batch's ring positions (and so its slots or mbufs) are released only when BOTH
 *   - the kernel is done with its pages: the zero-copy completion (MSG_ZEROCOPY: a range read
 *     from the error queue; SEND_ZC: the notification CQE); in copy mode, the send itself, and
 *   - the receiver acknowledged it, or said in its HELLO after a reconnect that it published it.
 * Batches released any other way are counted lost (lost_batches, lost_packets) and logged:
 * after a disconnect the batches still unacknowledged wait for the next HELLO, which says
 * exactly which of them arrived; on stop, whatever is still unacknowledged is lost.  So
 * batches sent = acknowledged + lost, exactly, and a batch is never dropped silently.
 *
 * The kernel's "copied" flag (SO_EE_CODE_ZEROCOPY_COPIED, IORING_NOTIF_USAGE_ZC_COPIED) is
 * counted in copied_completions: on loopback and veth the kernel copies anyway.
 *
 * Connect: each new connection is authenticated (cfg->authenticate, the Python handshake of
 * dataplane/transport/auth.py) before the first byte of ours; a failed handshake closes it and
 * is retried after the backoff, like a refused connect.
 *
 * Disconnect: SO_LINGER 0 so close() purges the send queue at once (the kernel lets go of the
 * arena pages it still referenced), then reconnect with backoff (backoff_min_ms doubling to
 * backoff_max_ms).  The ring is not consumed while disconnected: it fills and the worker
 * feeding it drops and counts.
 *
 * One file of ~500 lines on purpose: the batch bookkeeping, the two zero-copy completion paths
 * and the connection handling all work on struct tx, which would otherwise need a private
 * header of its own.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "dp_common.h"
#include "dp_transport.h"

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif
/* Newer than liburing 2.3's headers, present in the running kernel (6.2+). */
#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)
#endif

#define INFL 1024u   /* batch bookkeeping ring; cfg->max_inflight caps what is used */

struct txb {
    uint64_t seq, start;       /* batch seq; ring index of its first descriptor */
    uint32_t count, bytes;
    uint32_t zc_last;          /* MSG_ZEROCOPY: id of its last send call */
    uint32_t notifs;           /* SEND_ZC: notifications still to come */
    uint8_t  sent, acked;
    /* The header is sent by reference too: it must stay put until the batch completes, so it
     * lives here and not in one buffer the next batch would overwrite under the kernel. */
    struct dp_tw_frame hdr;
};

struct tx {
    struct dp_t_end e;
    int bad_desc;               /* a descriptor pointed outside the arena: stop (bad_why) */
    char bad_why[200];
    int have_uring, hello;
    struct io_uring ring;
    struct dp_cons c;          /* c.next: the next descriptor to ship; c.cons: released */
    uint64_t seq, session;
    uint64_t head, tail;       /* inflight batches: [head, tail) in b[] */
    struct txb b[INFL];
    /* the batch being sent: iovecs, how far it got */
    struct iovec iov[DP_TW_MAX_BATCH + 2];
    struct msghdr msg;
    int cur, uring_busy, niov;
    /* MSG_ZEROCOPY ids issued / completed (in order on TCP).  The kernel numbers each socket's
     * sends from 0; ours run on across sockets: ours = zc_base + the kernel's. */
    uint32_t zc_next, zc_done, zc_base;
    uint8_t rbuf[sizeof(struct dp_tw_msg) * 64];
    uint32_t rlen;
    /* connecting: the next attempt not before retry_at, after backoff ms; since: connected */
    uint64_t backoff, retry_at, connects, since;
};

/* Batch seqs are consecutive in b[], so a seq finds its batch by subtraction. */
static struct txb *tx_find(struct tx *x, uint64_t seq)
{
    if (x->head == x->tail)
        return NULL;
    uint64_t first = x->b[x->head % INFL].seq;
    if (seq < first || seq - first >= x->tail - x->head)
        return NULL;
    return &x->b[(x->head + (seq - first)) % INFL];
}

/* Release finished batches, oldest first: ring positions go back in order. */
static void tx_retire(struct tx *x)
{
    while (x->head < x->tail) {
        struct txb *b = &x->b[x->head % INFL];
        int zc = x->e.cfg->mode == DP_TM_ZEROCOPY ? (int32_t)(b->zc_last - x->zc_done) < 0
               : x->e.cfg->mode == DP_TM_SEND_ZC ? b->notifs == 0 : 1;
        if (!(b->sent && b->acked && zc))
            break;
        dp_ring_release(&x->c, b->count);   /* b->start == c.cons: slots back to producer */
        x->head++;
    }
}

static void tx_lose(struct tx *x, struct txb *b, const char *why)
{
    x->e.t->c.lost_batches++;
    x->e.t->c.lost_packets += b->count;
    dp_t_log(x->e.cfg, "batch %llu (%u packets) lost: %s", (unsigned long long)b->seq, b->count,
             why);
}

static void tx_disconnect(struct tx *x, const char *why)
{
    if (x->e.fd < 0)
        return;
    dp_t_log(x->e.cfg, "connection to %s:%u ended: %s; %llu batch(es) unacknowledged",
             x->e.cfg->host, x->e.cfg->tcp_port, why, (unsigned long long)(x->tail - x->head));
    if (x->uring_busy) {          /* let the send in flight finish (it fails) before close */
        shutdown(x->e.fd, SHUT_RDWR);
        struct io_uring_cqe *cqe;
        while (x->uring_busy && io_uring_wait_cqe(&x->ring, &cqe) == 0) {
            if (!(cqe->flags & IORING_CQE_F_NOTIF))
                x->uring_busy = 0;
            else if (tx_find(x, cqe->user_data))
                tx_find(x, cqe->user_data)->notifs--;
            io_uring_cqe_seen(&x->ring, cqe);
        }
    }
    if (x->head != x->tail) {   /* RST, send queue purged: the kernel lets go of our pages */
        struct linger lg = { 1, 0 };
        setsockopt(x->e.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(x->e.fd);
    x->e.fd = -1;
    x->e.t->connected = 0;
    x->e.t->c.disconnects++;
    /* The kernel has let go; completions for this socket will not come.  A batch half sent
     * was never received whole: it is lost now, and later batches were never sent. */
    for (uint64_t i = x->head; i < x->tail; i++) {
        struct txb *b = &x->b[i % INFL];
        b->notifs = 0;
        if (!b->sent) {
            b->sent = 1;
            b->acked = 1;
            tx_lose(x, b, "not sent whole before the disconnect");
        }
    }
    x->zc_done = x->zc_base = x->zc_next;   /* every send so far counts as completed */
    x->cur = 0;
    x->hello = 0;
    x->rlen = 0;
}

static int tx_connect(struct tx *x)
{
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(x->e.cfg->tcp_port) };
    inet_pton(AF_INET, x->e.cfg->host, &sa.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    struct timeval tv = { 1, 0 };  /* connect gives up after 1 s: stop stays responsive */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (x->e.cfg->mode == DP_TM_ZEROCOPY &&
        setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof(one)) < 0) {
        close(fd);
        return -2;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    /* blocking, bounded by the handshake's own deadline; counted and logged by its caller */
    if (x->e.cfg->authenticate && x->e.cfg->authenticate(fd) != 0) {
        close(fd);
        return -3;
    }
    int fl = 1;
    ioctl(fd, FIONBIO, &fl);
    x->e.fd = fd;
    return 0;
}

/* Acks and the hello.  -1: the connection is gone (or spoke nonsense). */
static int tx_read_acks(struct tx *x)
{
    for (;;) {
        ssize_t k = recv(x->e.fd, x->rbuf + x->rlen, sizeof(x->rbuf) - x->rlen, MSG_DONTWAIT);
        if (k == 0) {
            tx_disconnect(x, "receiver closed the connection");
            return -1;
        }
        if (k < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            tx_disconnect(x, strerror(errno));
            return -1;
        }
        x->rlen += (uint32_t)k;
        uint32_t off = 0;
        for (; x->rlen - off >= sizeof(struct dp_tw_msg); off += sizeof(struct dp_tw_msg)) {
            struct dp_tw_msg m;
            memcpy(&m, x->rbuf + off, sizeof(m));
            if (m.magic != DP_TW_ACK_MAGIC || m.version != DP_TW_VERSION) {
                x->e.t->c.bad_frames++;
                tx_disconnect(x, "bad message from the receiver");
                return -1;
            }
            if (m.type == DP_TW_HELLO) {
                /* What the receiver published last says which unacknowledged batches of
                 * ours arrived before the old connection died: delivered; the rest lost. */
                for (uint64_t i = x->head; i < x->tail; i++) {
                    struct txb *b = &x->b[i % INFL];
                    if (b->acked)
                        continue;
                    b->acked = 1;
                    if (m.session == x->session && b->seq <= m.seq)
                        x->e.t->c.acks++;
                    else
                        tx_lose(x, b, "sent, but the receiver did not publish it");
                }
                x->hello = 1;
            } else if (m.type == DP_TW_ACK && m.session == x->session && tx_find(x, m.seq)) {
                /* cumulative: every batch up to m.seq is published */
                for (uint64_t i = x->head; i < x->tail; i++) {
                    struct txb *b = &x->b[i % INFL];
                    if (b->seq > m.seq)
                        break;
                    if (!b->acked) {
                        b->acked = 1;
                        x->e.t->c.acks++;
                    }
                }
            }
        }
        memmove(x->rbuf, x->rbuf + off, x->rlen - off);
        x->rlen -= off;
    }
}

/* MSG_ZEROCOPY completions: ranges of send-call ids, from the error queue. */
static void tx_errqueue(struct tx *x)
{
    for (;;) {
        char ctl[128];
        struct msghdr m = { .msg_control = ctl, .msg_controllen = sizeof(ctl) };
        if (recvmsg(x->e.fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0)
            return;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            if (!((c->cmsg_level == SOL_IP && c->cmsg_type == IP_RECVERR) ||
                  (c->cmsg_level == SOL_IPV6 && c->cmsg_type == IPV6_RECVERR)))
                continue;
            struct sock_extended_err ee;
            memcpy(&ee, CMSG_DATA(c), sizeof(ee));
            if (ee.ee_origin != SO_EE_ORIGIN_ZEROCOPY || ee.ee_errno != 0)
                continue;
            uint32_t n = ee.ee_data - ee.ee_info + 1;
            x->e.t->c.completions += n;
            if (ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED)
                x->e.t->c.copied_completions += n;
            if ((int32_t)(x->zc_base + ee.ee_data + 1 - x->zc_done) > 0)
                x->zc_done = x->zc_base + ee.ee_data + 1;
        }
    }
}

/* k more bytes of the current batch went out; count it once it went out whole. */
static void tx_sent(struct tx *x, struct txb *b, size_t k)
{
    dp_t_iov_advance(&x->msg.msg_iov, &x->niov, k);
    if (x->niov == 0) {
        b->sent = 1;
        x->cur = 0;
        x->e.t->c.batches++;
        x->e.t->c.packets += b->count;
        x->e.t->c.bytes += b->bytes;
    }
}

static void tx_cqes(struct tx *x)
{
    struct io_uring_cqe *cqe;
    while (io_uring_peek_cqe(&x->ring, &cqe) == 0) {
        struct txb *b = tx_find(x, cqe->user_data);
        if (cqe->flags & IORING_CQE_F_NOTIF) {
            x->e.t->c.completions++;
            if (cqe->res & IORING_NOTIF_USAGE_ZC_COPIED)
                x->e.t->c.copied_completions++;
            if (b && b->notifs)
                b->notifs--;
        } else {
            x->uring_busy = 0;
            if (b && (cqe->flags & IORING_CQE_F_MORE))
                b->notifs++;
            if (cqe->res < 0) {
                int e = -cqe->res;
                io_uring_cqe_seen(&x->ring, cqe);
                if (e != EAGAIN && e != EINTR) {
                    tx_disconnect(x, strerror(e));
                    return;
                }
                continue;
            }
            if (b)
                tx_sent(x, b, (size_t)cqe->res);
        }
        io_uring_cqe_seen(&x->ring, cqe);
    }
}

/* Take the next batch off the ring (without releasing it) and lay out its iovecs. */
static int tx_take(struct tx *x)
{
    uint64_t start;
    uint32_t n = dp_ring_peek(&x->c, x->e.cfg->max_batch, &start);
    if (n == 0)
        return 0;
    uint32_t bytes = 0, i;
    int v = 2;
    for (i = 0; i < n; i++) {
        const struct dp_desc *d = dp_ring_at(x->e.r, start + i);
        uint64_t addr = d->addr, len = d->len;   /* read once: another process writes them */
        if (addr < sizeof(struct dp_arena) || addr > x->e.cfg->arena_len ||
            len > x->e.cfg->arena_len - addr) {
            /* never sent, never freed: the frame would be memory outside the arena */
            x->bad_desc = 1;
            snprintf(x->bad_why, sizeof(x->bad_why), "descriptor at position %llu points "
                     "outside the arena (addr %llu len %llu, arena %llu bytes): corrupted or "
                     "foreign writer", (unsigned long long)(start + i),
                     (unsigned long long)addr, (unsigned long long)len,
                     (unsigned long long)x->e.cfg->arena_len);
            dp_ring_cancel(&x->c, n);
            return 0;
        }
        if (i && bytes + len > x->e.cfg->max_bytes)
            break;
        char *p = (char *)x->e.a + addr;
        if (v > 2 && (char *)x->iov[v - 1].iov_base + x->iov[v - 1].iov_len == p)
            x->iov[v - 1].iov_len += len;   /* adjacent frames: one iovec */
        else if (len)
            x->iov[v++] = (struct iovec){ p, len };
        bytes += (uint32_t)len;
    }
    dp_ring_cancel(&x->c, n - i);   /* past max_bytes: the next batch's */
    n = i;
    struct txb *b = &x->b[x->tail % INFL];
    *b = (struct txb){ .seq = ++x->seq, .start = start, .count = n, .bytes = bytes };
    b->hdr = (struct dp_tw_frame){ DP_TW_MAGIC, DP_TW_VERSION, sizeof(b->hdr), n, bytes,
                                   b->seq, x->session };
    x->iov[0] = (struct iovec){ &b->hdr, sizeof(b->hdr) };
    x->iov[1] = (struct iovec){ dp_ring_at(x->e.r, start), n * sizeof(struct dp_desc) };
    x->msg = (struct msghdr){ .msg_iov = x->iov, .msg_iovlen = (size_t)v };
    x->niov = v;
    x->tail++;
    x->cur = 1;
    return 1;
}

/* Push the current batch.  1 progress, 0 would block, -1 disconnected. */
static int tx_push(struct tx *x)
{
    struct txb *b = &x->b[(x->tail - 1) % INFL];
    if (x->e.cfg->mode == DP_TM_SEND_ZC) {
        if (x->uring_busy)
            return 0;
        struct io_uring_sqe *sqe = io_uring_get_sqe(&x->ring);
        x->msg.msg_iovlen = (size_t)(x->niov > 1024 ? 1024 : x->niov);   /* UIO_MAXIOV */
        io_uring_prep_sendmsg_zc(sqe, x->e.fd, &x->msg, MSG_NOSIGNAL | MSG_WAITALL);
        sqe->ioprio |= IORING_SEND_ZC_REPORT_USAGE;
        sqe->user_data = b->seq;
        io_uring_submit(&x->ring);
        x->uring_busy = 1;
        return 1;
    }
    int flags = MSG_NOSIGNAL | MSG_DONTWAIT | (x->e.cfg->mode == DP_TM_ZEROCOPY ? MSG_ZEROCOPY : 0);
    x->msg.msg_iovlen = (size_t)(x->niov > 1024 ? 1024 : x->niov);
    ssize_t k = sendmsg(x->e.fd, &x->msg, flags);
    if (k < 0) {
        if (errno == EAGAIN || errno == ENOBUFS || errno == EINTR)
            return 0;   /* ENOBUFS: too many zero-copy sends pending; completions free them */
        tx_disconnect(x, strerror(errno));
        return -1;
    }
    if (x->e.cfg->mode == DP_TM_ZEROCOPY)
        b->zc_last = x->zc_next++;
    tx_sent(x, b, (size_t)k);
    return 1;
}

/* busy: progress was made, look again at once.  Else sleep until an ack, room in the socket
 * for the batch being sent, a completion (SEND_ZC: the ring's fd), or 1 ms (the ring). */
static void tx_wait(struct tx *x, int busy)
{
    struct pollfd pf[2] = { { x->e.fd, POLLIN | (x->cur && !x->uring_busy ? POLLOUT : 0), 0 },
                            { x->have_uring ? x->ring.ring_fd : -1, POLLIN, 0 } };
    if (poll(pf, 2, busy ? 0 : 1) <= 0)
        return;
    if (pf[0].revents & POLLERR && x->e.cfg->mode == DP_TM_ZEROCOPY)
        tx_errqueue(x);
    if (pf[0].revents & (POLLIN | POLLHUP | POLLERR))
        tx_read_acks(x);
}

/* Checks the config and sets up what the chosen mode needs; -1 with the error in t. */
static int tx_setup(struct tx *x, void *arena_base, uint32_t ring, struct dp_transport *t,
                    const struct dp_transport_config *cfg)
{
    if (dp_t_start(&x->e, arena_base, ring, t, cfg) < 0)
        return -1;
    if (cfg->max_batch == 0 || cfg->max_batch > DP_TW_MAX_BATCH || cfg->max_inflight == 0 ||
        cfg->max_inflight > INFL)
        return dp_t_fail(t, "max_batch %u (1..%u), max_inflight %u (1..%u)", cfg->max_batch,
                         DP_TW_MAX_BATCH, cfg->max_inflight, INFL);
    struct in_addr ia;
    if (inet_pton(AF_INET, cfg->host, &ia) != 1)
        return dp_t_fail(t, "peer address %s is not an IPv4 address", cfg->host);
    if (cfg->mode == DP_TM_SEND_ZC) {
        int e = io_uring_queue_init(64, &x->ring, 0);
        if (e < 0)
            return dp_t_fail(t, "io_uring_queue_init: %s", strerror(-e));
        x->have_uring = 1;
    }
    dp_cons_init(&x->c, x->e.r);
    x->session = cfg->session ? cfg->session : dp_real_ns();
    x->backoff = cfg->backoff_min_ms;
    return 0;
}

/* Not connected: connect (and authenticate) when the backoff allows.  1 connected now, 0 not
 * yet, -1 a fatal error (in t). */
static int tx_reconnect(struct tx *x)
{
    const struct dp_transport_config *cfg = x->e.cfg;
    if (dp_mono_ns() < x->retry_at) {
        usleep(2000);
        return 0;
    }
    int rc = tx_connect(x);
    if (rc == -2)
        return dp_t_fail(x->e.t, "SO_ZEROCOPY: %s", strerror(errno));
    if (rc < 0) {
        if (rc == -1)   /* -3: the handshake failed, logged rate-limited where it ran */
            dp_t_log(cfg, "connect to %s:%u: %s; reconnecting in %llu ms", cfg->host,
                     cfg->tcp_port, strerror(errno), (unsigned long long)x->backoff);
        x->retry_at = dp_mono_ns() + x->backoff * 1000000u;
        x->backoff = x->backoff * 2 > cfg->backoff_max_ms ? cfg->backoff_max_ms : x->backoff * 2;
        return 0;
    }
    x->e.t->c.reconnects += x->connects++ > 0;
    x->e.t->connected = 1;
    x->since = dp_mono_ns();
    dp_t_log(cfg, "connected to %s:%u", cfg->host, cfg->tcp_port);
    return 1;
}

/* Stopped: what was never acknowledged is lost, and said so. */
static void tx_finish(struct tx *x)
{
    if (x->e.fd >= 0)
        tx_disconnect(x, "stopping");
    for (uint64_t i = x->head; i < x->tail; i++) {
        struct txb *b = &x->b[i % INFL];
        if (!b->acked) {
            b->acked = 1;
            tx_lose(x, b, "unacknowledged at stop");
        }
    }
    tx_retire(x);
    if (x->have_uring)
        io_uring_queue_exit(&x->ring);
    __atomic_store_n(&x->e.t->state, DP_W_STOPPED, __ATOMIC_RELEASE);
}

int dp_transport_send_run(void *arena_base, uint32_t ring, struct dp_transport *t,
                          const struct dp_transport_config *cfg)
{
    static struct tx x;   /* large (iovecs, batches): one sender per process */
    memset(&x, 0, sizeof(x));
    if (tx_setup(&x, arena_base, ring, t, cfg) < 0)
        return -1;
    uint64_t drain_until = 0;
    __atomic_store_n(&t->state, DP_W_RUNNING, __ATOMIC_RELEASE);
    for (;;) {
        uint64_t now = dp_mono_ns();
        dp_heartbeat(&t->heartbeat_ns);
        /* On stop, take nothing new and give what is in flight up to 2 s to be acknowledged,
         * so a clean stop loses nothing. */
        int stop = __atomic_load_n(&t->stop, __ATOMIC_RELAXED) != 0;
        if (stop && !drain_until)
            drain_until = now + 2000000000ull;
        if (stop && (x.head == x.tail || x.e.fd < 0 || now > drain_until))
            break;
        if (x.e.fd < 0) {
            int rc = tx_reconnect(&x);
            if (rc < 0)
                return -1;
            if (rc == 0)
                continue;
        }
        if (!x.hello && now > x.since && now - x.since > 3000000000ull) {
            tx_disconnect(&x, "no hello from the receiver within 3 s");
            continue;
        }
        int busy = 0;
        if (!stop && x.hello && !x.cur && x.tail - x.head < cfg->max_inflight)
            busy |= tx_take(&x);
        if (x.c.fault) {   /* the worker's prod was impossible (dp_ring.h): read nothing on */
            char why[DP_ERR_LEN];
            dp_ring_why(why, sizeof(why), 0, x.c.bad, x.c.cons, x.c.prod_cache, x.c.size);
            return dp_t_fail(t, "ring %u: %s", ring, why);
        }
        if (x.bad_desc)
            return dp_t_fail(t, "ring %u: %s", ring, x.bad_why);
        if (x.hello && x.cur) {
            int rc = tx_push(&x);   /* 0: the socket is full, wait for room below */
            if (rc < 0)
                continue;
            busy |= rc;
        }
        if (x.e.fd >= 0 && x.have_uring)
            tx_cqes(&x);
        if (x.e.fd >= 0 && cfg->mode == DP_TM_ZEROCOPY && x.zc_next != x.zc_done)
            tx_errqueue(&x);
        if (x.e.fd >= 0)
            tx_wait(&x, busy);
        if (x.hello)   /* a connection that got as far as the hello resets the backoff */
            x.backoff = cfg->backoff_min_ms;
        tx_retire(&x);
    }
    tx_finish(&x);
    return 0;
}
