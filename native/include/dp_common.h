/* dp_common.h: what every native process of the dataplane (DPDK worker, io_uring worker, TCP
 * transport) shares: the clocks, the heartbeat, recording why set-up failed, and attaching a
 * worker to its arena.  core/common.c. */
#ifndef DP_COMMON_H
#define DP_COMMON_H

#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "dp_gen.h"
#include "dp_ring.h"
#include "dp_worker.h"

static inline uint64_t dp_clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* CLOCK_MONOTONIC: heartbeats, deadlines, pacing. */
static inline uint64_t dp_mono_ns(void) { return dp_clock_ns(CLOCK_MONOTONIC); }
/* CLOCK_REALTIME: what descriptors (rx_ns) and trailers (tx_ns) carry. */
static inline uint64_t dp_real_ns(void) { return dp_clock_ns(CLOCK_REALTIME); }

/* A process is alive while its heartbeat (arena or transport control file) moves. */
static inline void dp_heartbeat(volatile uint64_t *heartbeat_ns)
{
    __atomic_store_n(heartbeat_ns, dp_mono_ns(), __ATOMIC_RELEASE);
}

/* Describe a received frame in d: the len bytes at frame, at byte offset addr of the arena,
 * received at ns on (port, queue), with the flags the receiver already knows (truncated,
 * copied).  l4proto 0: an Ethernet frame, parsed (malformed ones counted in c); otherwise the
 * frame is that protocol's payload (a UDP socket's datagram) and is not parsed.  Our
 * generator's trailer is flagged; truncation (ours or the parser's) is counted in c. */
static inline void dp_describe(struct dp_desc *d, const uint8_t *frame, uint64_t addr,
                               uint32_t len, uint16_t flags, uint64_t ns, uint16_t port,
                               uint16_t queue, uint8_t l4proto, struct dp_ring_counters *c)
{
    memset(d, 0, sizeof(*d));
    d->addr = addr;
    d->rx_ns = ns;
    d->len = (uint16_t)len;
    d->port = port;
    d->queue = (uint8_t)queue;
    d->l4proto = l4proto;
    if (l4proto == 0 && dp_parse(frame, len, d) < 0)
        c->malformed++;
    flags |= dp_gen_flag(frame, len, d->l4proto, flags);
    d->flags |= flags;
    c->truncated += !!(d->flags & DP_F_TRUNCATED);
}

/* Record why set-up failed: the message in error[DP_ERR_LEN], *state = DP_W_FAILED, and, when
 * who is not NULL, a line "who: message" on stderr.  Returns -1, for `return dp_fail(...)`. */
int dp_vfail(char *error, volatile uint32_t *state, const char *who, const char *fmt,
             va_list ap);
/* A worker's failure, logged as "<kind> worker <id>: ..." (kind: "dpdk", "uring"). */
int dp_worker_fail(struct dp_arena *a, const struct dp_worker_config *cfg, const char *kind,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* A worker's ring i gave an impossible consumer index (p->fault): "ring <i>: <why>" recorded as
 * dp_worker_fail does.  Returns -1. */
int dp_worker_ring_fault(struct dp_arena *a, const struct dp_worker_config *cfg, const char *kind,
                         uint32_t i, const struct dp_prod *p);

/* Attach a worker to its arena: check cfg's ports and burst (1..max_burst) and the arena's
 * ring size (at most max_ring_size) against the arena, record pid and DP_W_STARTING, and for
 * every ring wait until the consumer released what a dead predecessor published there (its
 * frames live in slots or buffers this worker is about to reuse, and cons is the consumer's:
 * never written here; indices that cannot be a ring's, or a size or slots that are not the
 * arena's, fail at once), then check the ring's (port, queue) against cfg and start prod[i].
 * 0, or -1 after dp_worker_fail. */
int dp_worker_attach(struct dp_arena *a, const struct dp_worker_config *cfg, const char *kind,
                     uint32_t max_burst, uint32_t max_ring_size, struct dp_prod *prod);

#endif
