/* arena.c: compute, format and map the arena described in dp_layout.h. */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dp_common.h"

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

int dp_arena_layout(struct dp_arena *a, uint32_t n_ports, uint32_t n_rings, uint32_t ring_size,
                    uint32_t slot_size, uint64_t pool_len)
{
    if (n_ports > DP_MAX_PORTS || n_rings > DP_MAX_RINGS || ring_size == 0 ||
        (ring_size & (ring_size - 1)) || slot_size % DP_CACHE_LINE)
        return -1;
    memset(a, 0, sizeof(*a));
    a->magic = DP_MAGIC;
    a->version = DP_LAYOUT_VERSION;
    a->header_size = sizeof(struct dp_arena);
    a->n_ports = n_ports;
    a->n_rings = n_rings;
    a->ring_size = ring_size;
    a->slot_size = slot_size;
    a->desc_size = sizeof(struct dp_desc);
    a->rings_off = align_up(sizeof(struct dp_arena), 4096);
    a->ring_stride = align_up(sizeof(struct dp_ring) + (uint64_t)ring_size * sizeof(struct dp_desc),
                              4096);
    a->slots_off = align_up(a->rings_off + n_rings * a->ring_stride, 4096);
    /* The pool is 2 MB aligned within the file: af_xdp needs its UMEM in 2 MB pages. */
    a->pool_off = align_up(a->slots_off + (uint64_t)n_rings * ring_size * slot_size, DP_HUGE_PAGE);
    a->pool_len = align_up(pool_len, DP_HUGE_PAGE);
    a->arena_size = a->pool_off + a->pool_len;
    return 0;
}

void dp_arena_format(void *base, const struct dp_arena *layout, const uint16_t *ring_port,
                     const uint16_t *ring_queue)
{
    struct dp_arena *a = base;
    memcpy(a, layout, sizeof(*a));
    for (uint32_t i = 0; i < a->n_rings; i++) {
        struct dp_ring *r = dp_arena_ring(base, i);
        r->size = a->ring_size;
        r->mask = a->ring_size - 1;
        r->port = ring_port[i];
        r->queue = ring_queue[i];
        r->slots_off = a->slots_off + (uint64_t)i * a->ring_size * a->slot_size;
    }
    /* magic last: a reader that sees it sees a formatted arena */
    __atomic_store_n(&a->magic, DP_MAGIC, __ATOMIC_RELEASE);
}

struct dp_ring *dp_arena_ring(void *base, uint32_t i)
{
    struct dp_arena *a = base;
    return (struct dp_ring *)((char *)base + a->rings_off + i * a->ring_stride);
}

uint64_t dp_ring_load_prod(const struct dp_ring *r)
{
    return __atomic_load_n(&r->prod, __ATOMIC_ACQUIRE);
}

void dp_ring_store_cons(struct dp_ring *r, uint64_t cons)
{
    __atomic_store_n(&r->cons, cons, __ATOMIC_RELEASE);
}

uint64_t dp_ring_claim(struct dp_ring *r, uint64_t expect, uint64_t mine)
{
    __atomic_compare_exchange_n(&r->claim, &expect, mine, 0, __ATOMIC_ACQ_REL,
                                __ATOMIC_ACQUIRE);
    return expect;
}

void dp_ring_store_prod(struct dp_ring *r, uint64_t prod)
{
    __atomic_store_n(&r->prod, prod, __ATOMIC_RELEASE);
}

void *dp_arena_map(const char *path, uint64_t *len_out)
{
    /* Not through a link (ELOOP), and only a regular file of ours or root's that nobody else
     * may touch (EPERM), at least one header long (EINVAL): the same as Arena.open. */
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return NULL;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return NULL;
    }
    int why = !S_ISREG(st.st_mode) || (size_t)st.st_size < sizeof(struct dp_arena) ? EINVAL :
              (st.st_uid != 0 && st.st_uid != geteuid()) || (st.st_mode & 077) ? EPERM : 0;
    if (why) {
        close(fd);
        errno = why;
        return NULL;
    }
    size_t len = (size_t)st.st_size;
    /* Reserve len + 2 MB of address space, then map the file 2 MB aligned inside it, so the
     * pool (2 MB aligned within the file) is 2 MB aligned in memory too. */
    char *resv = mmap(NULL, len + DP_HUGE_PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (resv == MAP_FAILED) {
        close(fd);
        return NULL;
    }
    char *at = (char *)align_up((uint64_t)resv, DP_HUGE_PAGE);
    void *base = mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    int saved = errno;
    close(fd);
    if (base == MAP_FAILED) {
        munmap(resv, len + DP_HUGE_PAGE);
        errno = saved;
        return NULL;
    }
    if (at > resv)
        munmap(resv, (size_t)(at - resv));
    size_t tail = (size_t)(resv + len + DP_HUGE_PAGE - (at + len));
    if (tail)
        munmap(at + len, tail);
    *len_out = len;
    return base;
}

int dp_arena_unmap(void *base, uint64_t len)
{
    return munmap(base, len);
}

/* A dead predecessor may have left descriptors the consumer has not given back yet; their
 * frames live in slots or buffers the new worker is about to reuse, and cons belongs to the
 * consumer: so wait for it to catch up, beating the heart meanwhile, and never write cons.
 * Returns 0 when drained, -1 after `seconds`, -2 when told to stop, -3 at once when prod - cons
 * is more than the ring holds (cons ahead of prod, or far behind it: no wait would end that);
 * *left: still held. */
int dp_ring_wait_drained(void *base, uint32_t i, uint32_t seconds, uint64_t *left)
{
    struct dp_arena *a = base;
    struct dp_ring *r = dp_arena_ring(base, i);
    uint64_t deadline = dp_mono_ns() + seconds * 1000000000ull;
    uint64_t cons;
    while ((cons = __atomic_load_n(&r->cons, __ATOMIC_ACQUIRE)) != r->prod) {
        *left = r->prod - cons;
        if (*left > r->size)
            return -3;
        if (a->stop)
            return -2;
        if (dp_mono_ns() > deadline)
            return -1;
        dp_heartbeat(&a->heartbeat_ns);
        usleep(10000);
    }
    *left = 0;
    return 0;
}
