/* transport_common.c: what both ends of the TCP transport share (dp_transport.h): their log
 * line, their failure record, their start, stepping an iovec array past the bytes a call
 * moved. */
#include <stdarg.h>
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
