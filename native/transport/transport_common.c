/* transport_common.c: what both ends of the TCP transport share (dp_transport.h): their log
 * line, their failure record, their start, stepping an iovec array past the bytes a call
 * moved; and the frame check (dp_tw_check), kept apart from the receiver's socket code so it
 * can be fuzzed as a pure function. */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/uio.h>
#include <unistd.h>

#include "dp_common.h"
#include "dp_transport.h"

void dp_t_log(const struct dp_transport_config *cfg, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "transport %s: %s\n", cfg->name, line);   /* one write per line */
}

/* Not logged here: the transport's Python side prints t->error when the run returns -1. */
int dp_t_fail(struct dp_transport *t, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    dp_vfail(t->error, &t->state, NULL, fmt, ap);
    va_end(ap);
    return -1;
}

int dp_t_start(struct dp_t_end *e, void *arena_base, uint32_t ring, struct dp_transport *t,
               const struct dp_transport_config *cfg)
{
    *e = (struct dp_t_end){ .a = arena_base, .t = t, .cfg = cfg, .fd = -1 };
    t->pid = getpid();
    __atomic_store_n(&t->state, DP_W_STARTING, __ATOMIC_RELEASE);
    if (ring >= e->a->n_rings)
        return dp_t_fail(t, "ring %u: the arena has %u", ring, e->a->n_rings);
    e->r = dp_arena_ring(arena_base, ring);
    return 0;
}

void dp_t_iov_advance(struct iovec **iov, int *n, size_t k)
{
    struct iovec *v = *iov;
    while (*n > 0 && k >= v->iov_len) {
        k -= v->iov_len;
        v++, (*n)--;
    }
    if (*n > 0) {
        v->iov_base = (char *)v->iov_base + k;
        v->iov_len -= k;
    }
    *iov = v;
}

static const char *tw_check_header(const struct dp_tw_frame *h, uint32_t ring_size,
                                   uint32_t slot_size)
{
    if (h->magic != DP_TW_MAGIC)
        return "bad magic";
    if (h->version != DP_TW_VERSION)
        return "unsupported version";
    if (h->header_len != sizeof(*h))
        return "bad header_len";
    if (h->count == 0 || h->count > DP_TW_MAX_BATCH || h->count > ring_size)
        return "count out of range";
    if ((uint64_t)h->payload_len > (uint64_t)h->count * slot_size)
        return "payload_len larger than count slots";
    return NULL;
}

int dp_tw_check(const struct dp_tw_frame *h, const struct dp_desc *d, uint32_t ring_size,
                uint32_t slot_size, char *why, size_t why_len)
{
    const char *bad = tw_check_header(h, ring_size, slot_size);
    if (bad) {
        snprintf(why, why_len, "%s (magic %08x version %u header_len %u count %u "
                 "payload_len %u)", bad, h->magic, h->version, h->header_len, h->count,
                 h->payload_len);
        return -1;
    }
    if (d == NULL)
        return 0;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < h->count; i++) {
        if (d[i].len > slot_size) {
            snprintf(why, why_len, "descriptor %u len %u > slot size %u", i, d[i].len,
                     slot_size);
            return -1;
        }
        sum += d[i].len;
    }
    if (sum != h->payload_len) {
        snprintf(why, why_len, "descriptor lengths sum to %llu, header says %u",
                 (unsigned long long)sum, h->payload_len);
        return -1;
    }
    return 0;
}
