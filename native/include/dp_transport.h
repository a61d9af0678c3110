/* dp_transport.h: the TCP transport (arena ring -> remote arena ring), its wire format, its
 * configuration and entry points.  Shared by native/transport/: transport_recv.c (receiver),
 * transport_send.c (sender) and transport_common.c.
 *
 * Wire format, little-endian, version DP_TW_VERSION:
 *
 *   sender -> receiver, one frame per batch:
 *     struct dp_tw_frame (32 bytes: magic, version, header_len, count, payload_len, batch_seq,
 *                         session)
 *     count x struct dp_desc   the sender's descriptors as they are in its ring (addr is the
 *                              sender's and is ignored; len says how many bytes follow)
 *     payload_len bytes        the frames, back to back, in descriptor order
 *   receiver -> sender:
 *     struct dp_tw_msg (24 bytes) HELLO once per connection, before anything else: the session
 *                              and seq of the last batch the receiver published (so a sender
 *                              that lost a connection learns which unacknowledged batches
 *                              arrived: they are delivered, the rest are lost, exactly), then
 *                              ACKs, cumulative: each says every batch of the session up to
 *                              its seq is published; at least one per DP_TW_ACK_EVERY
 *                              batches, and one whenever the receiver has read all there is.
 *
 * Every piece of a frame the sender writes is an iovec into its arena (header aside): the
 * descriptors straight from its ring, the bytes from the slots or the mbuf pool.
 *
 * Before any of this, each connection is authenticated (dataplane/transport/auth.py, Python:
 * one implementation of the handshake for both transports).  The receiver never listens in C:
 * its Python side accepts and authenticates, and hands only authenticated connections' fds
 * over a pipe (cfg->handoff_fd); the sender's C loop connects and has cfg->authenticate run
 * the handshake on the fresh socket before the first frame.
 */
#ifndef DP_TRANSPORT_H
#define DP_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>
#include "dp_layout.h"

/* cffi: begin */
#define DP_TW_MAGIC       0x31545044u  /* "DPT1" */
#define DP_TW_ACK_MAGIC   0x31415044u  /* "DPA1" */
#define DP_TW_VERSION     2u          /* 2: ACKs are cumulative */
#define DP_TW_HELLO       1u
#define DP_TW_ACK         2u
#define DP_TW_MAX_BATCH   1024u        /* descriptors per frame: bounds the receiver's reads */
#define DP_TW_ACK_EVERY   16u          /* batches one ACK may cover at most */

struct dp_tw_frame {
    uint32_t magic;
    uint16_t version;
    uint16_t header_len;    /* sizeof(struct dp_tw_frame): a later version may grow it */
    uint32_t count;         /* descriptors, 1..DP_TW_MAX_BATCH */
    uint32_t payload_len;   /* sum of the descriptors' len */
    uint64_t batch_seq;     /* 1, 2, ... per sender session, never reused */
    uint64_t session;       /* chosen by the sender at start */
};

struct dp_tw_msg {
    uint32_t magic;
    uint16_t version;
    uint16_t type;          /* DP_TW_HELLO or DP_TW_ACK */
    uint64_t seq;
    uint64_t session;
};

#define DP_TM_COPY      0   /* plain sendmsg: the kernel copies, completion = sent */
#define DP_TM_ZEROCOPY  1   /* sendmsg(MSG_ZEROCOPY), completions from the error queue */
#define DP_TM_SEND_ZC   2   /* io_uring SENDMSG_ZC, completions are notification CQEs */

struct dp_transport_config {
    char     name[64];      /* for log lines */
    char     host[64];      /* send: peer address; recv: address to listen on */
    uint16_t tcp_port;
    uint16_t mode;          /* DP_TM_* (send only) */
    uint16_t port_index;    /* recv: the arena port stamped on published descriptors */
    uint16_t pad0;
    uint32_t max_batch;     /* send: descriptors per frame, <= DP_TW_MAX_BATCH */
    uint32_t max_bytes;     /* send: frame bytes per frame (a batch ends before it passes) */
    uint32_t max_inflight;  /* send: batches sent and not yet acknowledged + completed */
    uint32_t backoff_min_ms;
    uint32_t backoff_max_ms;
    uint64_t session;       /* send: 0 picks one from the clock */
    uint64_t arena_len;     /* send: bytes mapped at arena_base: every descriptor's frame must
                               lie inside (a descriptor is written by another process) */
    int32_t  handoff_fd;    /* recv: read end of a pipe (O_NONBLOCK) carrying each authenticated
                               connection's fd as an int; it replaces the current connection */
    uint32_t io_timeout_ms; /* recv: an ack not taken, or a frame stalled mid-way, for this long
                               drops the peer (slow_peers, short_reads) */
    /* send: run on each connected socket before anything else (blocking); 0 authenticated,
     * else the connection is closed and retried after the backoff.  NULL: none. */
    int    (*authenticate)(int fd);
};

/* Check a frame's header h against a ring of ring_size positions and slots of slot_size bytes,
 * and, when d is not NULL, its h->count descriptors (each fits a slot, their lens sum to
 * payload_len).  A pure function of its arguments (the receiver's parser, fuzzed by
 * tests/test_transport_fuzz.py): 0 valid, -1 not, with the reason in why[why_len]. */
int dp_tw_check(const struct dp_tw_frame *h, const struct dp_desc *d, uint32_t ring_size,
                uint32_t slot_size, char *why, size_t why_len);

/* Consume ring `ring` of the arena at arena_base, ship it to cfg->host:tcp_port, release each
 * batch once it is acknowledged and its send completed.  Runs until t->stop.  0, or -1 with
 * t->error filled (set-up only: a peer that misbehaves is logged, counted, reconnected). */
int dp_transport_send_run(void *arena_base, uint32_t ring, struct dp_transport *t,
                          const struct dp_transport_config *cfg);
/* Serve the authenticated connections handed over on cfg->handoff_fd, one at a time: publish
 * every received batch on ring `ring` of the arena at arena_base (the receiver's own),
 * acknowledge it.  Runs until t->stop.  0, or -1. */
int dp_transport_recv_run(void *arena_base, uint32_t ring, struct dp_transport *t,
                          const struct dp_transport_config *cfg);

/* cffi: end */

/* Internal to native/transport/. */
void dp_t_log(const struct dp_transport_config *cfg, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
int  dp_t_fail(struct dp_transport *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* What both ends hold: the arena and the ring they publish on or consume, their control file,
 * their config, the connection (-1: none). */
struct dp_t_end {
    struct dp_arena *a;
    struct dp_ring *r;
    struct dp_transport *t;
    const struct dp_transport_config *cfg;
    int fd;
};
/* The start both ends share: pid, DP_W_STARTING, ring in range, *e filled.  0, or -1
 * (failed, in t->error). */
int  dp_t_start(struct dp_t_end *e, void *arena_base, uint32_t ring, struct dp_transport *t,
                const struct dp_transport_config *cfg);
struct iovec;
/* Step iov and n past k bytes written or read (partial sends and reads). */
void dp_t_iov_advance(struct iovec **iov, int *n, size_t k);

#endif
