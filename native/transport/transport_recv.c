/* transport_recv.c: the receiving end of the TCP transport.  The wire format is in
 * dp_transport.h; the sender is transport_send.c, the helpers both share transport_common.c.
 *
 * The receiver serves one sender at a time, and only senders that proved the key: it never
 * listens itself.  Its Python side (dataplane/transport/tcp.py) accepts and authenticates, and
 * hands each authenticated connection's fd over a pipe (cfg->handoff_fd).  A connection handed
 * over replaces the current one (a sender that reconnects after a failure the receiver has not
 * noticed yet must not wait behind a dead socket); an unauthenticated one never reaches this
 * file, so it cannot displace anyone nor learn the session.  Per frame: read and check the header (magic, version, header_len, count,
 * payload_len against the ring and slot sizes), read the descriptors and check every len and
 * their sum, reserve ring positions, read the bytes straight into those positions' slots (the
 * kernel's copy out of the socket is the only one), publish, acknowledge.
 *
 * Acknowledgements are cumulative and coalesced: an ACK says every batch up to its seq is
 * published (one connection, published in order), and goes out once the socket holds nothing
 * more to read or DP_TW_ACK_EVERY batches wait for one, whichever comes first.  Under load that
 * is one small send per DP_TW_ACK_EVERY batches instead of one per batch, and the sender wakes
 * as rarely; a sender that pauses is acknowledged at once.
 *
 * A full ring WAITS (counted in ring_waits): the sender is a ring consumer, not a NIC, so the
 * wait becomes TCP backpressure, the sender's ring fills, and the worker feeding it drops and
 * counts (docs/design.md, invariant 2) where the loss is visible.  Dropping here would lose
 * batches the
 * sender has already been told nothing about.
 *
 * A bad header or bad descriptors (dp_tw_check, a pure function the tests fuzz): log (with the
 * peer), count bad_frames, close, keep serving.  A peer gone mid-frame, or silent mid-frame for
 * cfg->io_timeout_ms: log, count short_reads, close.  Nothing is published from a frame that
 * did not arrive whole.  Every write (HELLO, ACKs) is non-blocking and bounded by
 * io_timeout_ms: a peer that does not read its acks is dropped and counted (slow_peers), and
 * the next one is served.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
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

static int stopping(const struct dp_transport *t)
{
    return __atomic_load_n(&t->stop, __ATOMIC_RELAXED) != 0;
}

/* -- receiver -- */

struct rx {
    struct dp_t_end e;
    struct dp_prod p;
    uint64_t ack_seq, ack_session;  /* the last batch published and not yet acknowledged */
    uint32_t unacked;               /* batches published since the last ACK */
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
    x->unacked = 0;   /* the next connection's HELLO says what was published */
}

static uint64_t rx_timeout_ns(const struct rx *x)
{
    return (uint64_t)x->e.cfg->io_timeout_ms * 1000000u;
}

/* Send one message without ever blocking longer than io_timeout_ms: the socket is polled for
 * room in 20 ms steps (heartbeat, stop).  0 sent; -1 the connection failed or we stop; -2 the
 * peer did not take it in time (its receive buffer and our send buffer are full: it does not
 * read). */
static int rx_send_msg(struct rx *x, uint16_t type, uint64_t seq, uint64_t session)
{
    struct dp_tw_msg m = { DP_TW_ACK_MAGIC, DP_TW_VERSION, type, seq, session };
    size_t off = 0;
    uint64_t deadline = dp_mono_ns() + rx_timeout_ns(x);
    while (off < sizeof(m)) {
        ssize_t k = send(x->e.fd, (char *)&m + off, sizeof(m) - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k > 0) {
            off += (size_t)k;
            continue;
        }
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return -1;
        if (stopping(x->e.t))
            return -1;
        if (dp_mono_ns() > deadline)
            return -2;
        rx_beat(x);
        struct pollfd pf = { x->e.fd, POLLOUT, 0 };
        poll(&pf, 1, 20);
    }
    return 0;
}

/* Send a message; a failure closes the connection (what for: `what`), a slow peer is
 * counted.  0, or -1 closed. */
static int rx_say(struct rx *x, uint16_t type, uint64_t seq, uint64_t session, const char *what)
{
    int rc = rx_send_msg(x, type, seq, session);
    if (rc == 0)
        return 0;
    char why[96];
    if (rc == -2) {
        x->e.t->c.slow_peers++;
        snprintf(why, sizeof(why), "slow peer: %s not taken within %u ms", what,
                 x->e.cfg->io_timeout_ms);
    } else {
        snprintf(why, sizeof(why), "cannot send %s (peer gone)", what);
    }
    rx_close(x, why);
    return -1;
}

static int handoff_pending(const struct rx *x)
{
    struct pollfd pf = { x->e.cfg->handoff_fd, POLLIN, 0 };
    return poll(&pf, 1, 0) > 0;
}

/* Take the next authenticated connection from the handoff pipe: it replaces the current one
 * and is greeted with what was published last. */
static void rx_take(struct rx *x)
{
    int fd;
    if (read(x->e.cfg->handoff_fd, &fd, sizeof(fd)) != (ssize_t)sizeof(fd) || fd < 0)
        return;
    rx_close(x, "replaced by a new authenticated connection");
    x->e.fd = fd;
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    if (getpeername(fd, (struct sockaddr *)&sa, &sl) == 0 && sa.sin_family == AF_INET)
        snprintf(x->peer, sizeof(x->peer), "%s:%u", inet_ntoa(sa.sin_addr), ntohs(sa.sin_port));
    else
        snprintf(x->peer, sizeof(x->peer), "fd %d", fd);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));   /* acks are tiny */
    /* Acks are 24 bytes: a fixed buffer (no autotuning to megabytes) makes a peer that does
     * not read them fill it, and be dropped, after a bounded number of batches. */
    int sndbuf = 64 << 10;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    struct timeval tv = { 0, 20000 };     /* reads wake every 20 ms to look at stop/handoff */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (x->e.t->c.last_session || x->e.t->connected || x->e.t->c.disconnects)
        x->e.t->c.reconnects++;
    x->e.t->connected = 1;
    dp_t_log(x->e.cfg, "connection from %s (last published: session %llx seq %llu)", x->peer,
             (unsigned long long)x->e.t->c.last_session, (unsigned long long)x->e.t->c.last_seq);
    rx_say(x, DP_TW_HELLO, x->e.t->c.last_seq, x->e.t->c.last_session, "hello");
}

/* Read exactly the iovecs' bytes.  1 done; 0 nothing read (EOF: errno 0, an error, or
 * ECANCELED: stop or a new connection waiting); -1 the same after some bytes.  mid: a frame
 * has begun (its header was read): no progress for io_timeout_ms is a stall (ETIMEDOUT), as
 * it is once this read got a byte.  Between frames a sender may be idle as long as it likes. */
static int rx_read(struct rx *x, struct iovec *iov, int n, uint64_t *got_out, int mid)
{
    uint64_t got = 0, last = dp_mono_ns();
    while (n > 0) {
        ssize_t k = readv(x->e.fd, iov, n > 1024 ? 1024 : n);
        if (k > 0) {
            last = dp_mono_ns();
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
        if (stopping(x->e.t) || handoff_pending(x)) {
            *got_out = got;
            errno = ECANCELED;
            return got || mid ? -1 : 0;
        }
        if ((got || mid) && dp_mono_ns() - last > rx_timeout_ns(x)) {
            *got_out = got;
            errno = ETIMEDOUT;
            return -1;
        }
    }
    *got_out = got;
    return 1;
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

/* The pending ACK, when DP_TW_ACK_EVERY batches wait for it, nothing more is there to read
 * (the sender waits for it, or paused), or `now` (stopping: what was published is said so).
 * 0, or -1 closed. */
static int rx_ack(struct rx *x, int now)
{
    int queued = 0;
    if (x->e.fd < 0 || x->unacked == 0)
        return 0;
    if (!now && x->unacked < DP_TW_ACK_EVERY && ioctl(x->e.fd, FIONREAD, &queued) == 0 &&
        queued > 0)
        return 0;
    if (rx_say(x, DP_TW_ACK, x->ack_seq, x->ack_session, "ack") < 0)
        return -1;
    x->unacked = 0;
    x->e.t->c.acks++;
    return 0;
}

/* One frame.  0 on success, -1 when the connection was closed (logged, counted). */
static int rx_frame(struct rx *x)
{
    struct dp_tw_frame h;
    struct iovec v = { &h, sizeof(h) };
    uint64_t got;
    char why[192];
    if (rx_ack(x, 0) < 0)
        return -1;
    int rc = rx_read(x, &v, 1, &got, 0);
    if (rc == 0) {   /* between frames: not a short read */
        if (errno != ECANCELED)
            rx_close(x, errno ? strerror(errno) : "peer closed");
        return -1;
    }
    if (rc < 0)
        goto short_read;
    if (dp_tw_check(&h, NULL, x->p.size, x->e.a->slot_size, why, sizeof(why)) < 0)
        goto bad_frame;
    if (h.session == x->e.t->c.last_session && h.batch_seq <= x->e.t->c.last_seq) {
        snprintf(why, sizeof(why), "batch_seq %llu did not move forward (last %llu)",
                 (unsigned long long)h.batch_seq, (unsigned long long)x->e.t->c.last_seq);
        goto bad_frame;
    }
    v.iov_base = x->d;
    v.iov_len = h.count * sizeof(struct dp_desc);
    if (rx_read(x, &v, 1, &got, 1) != 1)
        goto short_read;
    if (dp_tw_check(&h, x->d, x->p.size, x->e.a->slot_size, why, sizeof(why)) < 0)
        goto bad_frame;
    if (dp_ring_reserve(&x->p, h.count) < h.count) {
        x->e.t->c.ring_waits++;
        while (dp_ring_reserve(&x->p, h.count) < h.count) {
            if (stopping(x->e.t) || x->p.fault)   /* fault: the run loop stops on it */
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
    if (n && rx_read(x, x->iov, n, &got, 1) != 1)
        goto short_read;
    rx_publish(x, &h);
    x->ack_seq = h.batch_seq;
    x->ack_session = h.session;
    x->unacked++;
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
    dp_t_log(x->e.cfg, "short read from %s: %s mid-frame (%s)", x->peer,
             errno == ETIMEDOUT ? "stalled" : "connection ended", errno ? strerror(errno) : "EOF");
    rx_close(x, "short read");
    return -1;
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
    if (cfg->io_timeout_ms == 0)
        return dp_t_fail(t, "io_timeout_ms 0: a peer that stops reading would wedge us");
    rx_beat(&x);
    __atomic_store_n(&t->state, DP_W_RUNNING, __ATOMIC_RELEASE);
    x.e.a->state = DP_W_RUNNING;
    while (!stopping(t)) {
        rx_beat(&x);
        if (x.e.fd < 0 || handoff_pending(&x)) {
            struct pollfd pf = { cfg->handoff_fd, POLLIN, 0 };
            if (poll(&pf, 1, 10) > 0)
                rx_take(&x);
            continue;
        }
        rx_frame(&x);
        if (x.p.fault) {   /* the consumer's cons was impossible (dp_ring.h): publish no more */
            char why[DP_ERR_LEN];
            dp_ring_why(why, sizeof(why), 1, x.p.bad, x.p.prod, x.p.cons_cache, x.p.size);
            rx_close(&x, "ring fault");
            x.e.a->state = DP_W_FAILED;
            return dp_t_fail(t, "ring %u: %s", ring, why);
        }
    }
    rx_ack(&x, 1);
    rx_close(&x, "stopping");
    x.e.a->state = DP_W_STOPPED;
    __atomic_store_n(&t->state, DP_W_STOPPED, __ATOMIC_RELEASE);
    return 0;
}
