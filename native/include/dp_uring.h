/* dp_uring.h: private state of the io_uring worker, shared by uring_sock.c (sockets, provided
 * buffers, socket drops, close) and uring_worker.c (the loop).  Not part of the arena contract:
 * nothing outside the io_uring worker includes it. */
#ifndef DP_URING_H
#define DP_URING_H

#include <liburing.h>
#include <sys/socket.h>

#include "dp_common.h"
#include "dp_gen.h"

#define URW_MAX_BURST DP_MAX_BURST
#define URW_MAX_BUFS  DP_URING_MAX_BUFS   /* the kernel's limit on a provided-buffer ring */

enum urw_kind { URW_RAW = 1, URW_UDP = 2 };

/* One ring: one socket, one provided-buffer group whose buffers are this ring's slots. */
struct urw_ring {
    struct dp_ring *r;
    struct dp_prod p;
    struct dp_uring_counters *uc;
    struct io_uring_buf_ring *br;   /* shared with the kernel: buffers it may fill */
    size_t br_len;
    uint16_t *bid;       /* the buffer (slot) behind each ring position */
    uint64_t returned;   /* ring index up to which buffers went back to the kernel */
    uint32_t n;          /* descriptors filled in the current batch of completions */
    uint64_t bytes;
    int fd, kind, armed, ever_armed, registered;
    uint16_t port, queue;
    uint64_t sk_drops;   /* UDP: SK_MEMINFO_DROPS already counted (a running total) */
};

struct urw {
    char *base;
    struct dp_arena *a;
    const struct dp_worker_config *cfg;
    struct io_uring uring;
    int uring_up;
    uint32_t n_rings;
    struct urw_ring ring[DP_MAX_RINGS];
    /* generator: frames built in a private buffer, sent with sendmmsg() */
    int gen_on, gen_fd;
    uint32_t gen_room;   /* bytes per frame buffer: the longest stream template */
    struct dp_gen_state gs;
    struct sockaddr_storage gen_to;
    uint8_t *txbuf;
    struct iovec *iov;
    struct mmsghdr *msgs;
};

#define urw_fail(w, ...) dp_worker_fail((w)->a, (w)->cfg, "uring", __VA_ARGS__)

/* uring_sock.c */
int  urw_setup(struct urw *w);
int  urw_gen_setup(struct urw *w);
void urw_give_back(struct urw *w, struct urw_ring *q, uint16_t bid, uint32_t n_advance);
void urw_sock_drops(struct urw *w);
void urw_close(struct urw *w);

#endif
