/* dp_worker.h: what Python hands a native worker, and the core's entry points (arena, ring,
 * parser, the io_uring worker) that dataplane._native exposes.  The DPDK worker's entry point is
 * in dp_dpdk.h (its own extension, dataplane._dpdk). */
#ifndef DP_WORKER_H
#define DP_WORKER_H

#include <stdint.h>
#include "dp_layout.h"

/* cffi: begin */
#define DP_NAME_LEN   128
/* Limits a worker refuses beyond (dp_worker_attach); the config checks them through cffi. */
#define DP_MAX_BURST  256         /* packets per burst: the workers' on-stack mbuf/CQE arrays */
#define DP_URING_MAX_BUFS 32768   /* io_uring's provided-buffer ring: the kernel refuses 65536
                                     entries or more, and a power of two below that is 32768;
                                     the io_uring worker's slots are its buffers: ring_size */
#define DP_TMPL_MAX   2048
#define DP_EAL_ARGS   48

struct dp_port_config {
    char     name[DP_NAME_LEN];   /* ethdev name: "net_af_packet0" (a --vdev) or "0000:00:03.0" */
    uint16_t n_rxq;               /* one ring per RX queue, in port order */
    uint16_t n_txq;
    uint16_t rxd;                 /* RX/TX descriptors per queue */
    uint16_t txd;
    /* io_uring worker only (dp_uring_worker_run): the socket it opens itself, no DPDK */
    char     iface[32];           /* AF_PACKET on this interface, n_rxq sockets in a fanout */
    uint16_t udp_port;            /* or, when non-zero, n_rxq UDP sockets on this port */
};

/* Generate mode: replay templates built with scapy, one per stream. */
#define DP_CSUM_NONE 0            /* leave checksums as in the template */
#define DP_CSUM_L4   1            /* recompute IPv4 header and UDP/TCP checksum per packet */
#define DP_GEN_MAX_SIZES 256      /* a stream's size cycle (an IMIX's weights spelled out) */
struct dp_gen_stream_config {
    uint32_t stream;              /* written into every trailer */
    uint32_t n_sizes;             /* 0: every frame is tmpl_len bytes; else frame k of the
                                     stream is sizes[k % n_sizes] bytes: the template cut to
                                     that length, IP/UDP lengths set, trailer at its end */
    uint64_t rate_pps;            /* 0: as fast as the port takes them (the arena's
                                     dp_gen_stream_ctl.rate_pps overrides it while running) */
    uint64_t count;               /* 0: until stopped */
    uint16_t tmpl_len;            /* the template's length: the largest frame */
    uint16_t vary_off;            /* 16-bit big-endian field varied per packet (0: none) */
    uint16_t vary_min;
    uint16_t vary_max;            /* value = vary_min + k % (vary_max - vary_min + 1) */
    uint16_t csum;                /* DP_CSUM_* */
    uint16_t sizes[DP_GEN_MAX_SIZES];
    uint8_t  tmpl[DP_TMPL_MAX];
    /* pcap replay, when n_frames > 0: a capture's frames (loaded once by the worker process,
     * which keeps these arrays for the worker's life) sent in order instead of the template;
     * frame k with trail[k] gets the trailer appended and takes the next seq.  Paced by
     * gap_ns[k], the wait before frame k (gap_ns[0]: between loops) already divided by the
     * speed, when pace_capture; else by rate_pps. */
    uint32_t n_frames;
    uint32_t pace_capture;
    uint32_t frame_max;           /* the longest frame sent, trailer included */
    const uint8_t  *frames;
    const uint32_t *frame_off;    /* frame k is frames[frame_off[k] .. + frame_len[k]] */
    const uint16_t *frame_len;
    const uint64_t *gap_ns;
    const uint8_t  *trail;
};

struct dp_gen_config {
    uint32_t enabled;
    uint16_t port;                /* worker-local port index to transmit on */
    uint16_t queue;
    uint32_t burst;               /* packets per TX burst, per stream */
    uint32_t n_streams;           /* 1..DP_GEN_MAX_STREAMS */
    struct dp_gen_stream_config s[DP_GEN_MAX_STREAMS];
};

struct dp_worker_config {
    uint32_t worker_id;
    uint32_t n_ports;
    struct dp_port_config port[DP_MAX_PORTS];
    struct dp_gen_config gen;
    uint32_t burst;               /* RX burst size */
    uint32_t n_mbufs;             /* mbuf pool size */
    uint32_t zero_copy;           /* 1: try the mbuf pool in the arena; 0: copy into slots */
    uint32_t idle_sleep_us;       /* 0: busy poll; else sleep this long after ~1 ms of empty polls
                                     (io_uring: also, up to 50 us, after a partial batch) */
    uint32_t copybreak;           /* zero copy: frames of at most this many bytes are copied */
    int32_t  eal_argc;
    const char *eal_argv[DP_EAL_ARGS];  /* built by Python as a list, never by a shell */
};

/* Map an arena file MAP_SHARED; the pool region ends up 2 MB aligned.  NULL + errno on error:
 * ELOOP a symbolic link, EPERM not ours or root's or open to others, EINVAL not a regular file
 * or shorter than a header. */
void *dp_arena_map(const char *path, uint64_t *len_out);
int   dp_arena_unmap(void *base, uint64_t len);

/* Compute offsets and sizes of an arena into *a (header fields only). 0, or -1 if too big. */
int   dp_arena_layout(struct dp_arena *a, uint32_t n_ports, uint32_t n_rings, uint32_t ring_size,
                      uint32_t slot_size, uint64_t pool_len);
/* Write a fresh header and ring headers into a zeroed, mapped arena.  ring_port/ring_queue
 * name each ring's (port, queue). */
void  dp_arena_format(void *base, const struct dp_arena *layout, const uint16_t *ring_port,
                      const uint16_t *ring_queue);
struct dp_ring *dp_arena_ring(void *base, uint32_t i);

/* Wait (heartbeat beating) until the consumer released what a dead predecessor published on
 * ring i.  0: drained; -1: not after `seconds`; -2: told to stop; -3: prod - cons is more than
 * the ring holds (corrupted).  *left: still held. */
int dp_ring_wait_drained(void *base, uint32_t i, uint32_t seconds, uint64_t *left);

/* Consumer side for Python: one call per batch, with the same barriers as dp_ring.h. */
uint64_t dp_ring_load_prod(const struct dp_ring *r);
void     dp_ring_store_cons(struct dp_ring *r, uint64_t cons);
/* The ring's consumer claim: compare-and-swap claim from `expect` to `mine`; the word found
 * (== expect when it took).  dataplane/shm/ring.py decides whether a claimant is alive. */
uint64_t dp_ring_claim(struct dp_ring *r, uint64_t expect, uint64_t mine);
/* Producer side for Python (the RDMA receiver publishes what the HCA wrote). */
void     dp_ring_store_prod(struct dp_ring *r, uint64_t prod);

/* Parse a frame and fill ethertype, l4proto, l4_off, hash and flags of *d.  Never reads past
 * frame[len - 1].  Returns 0, or -1 when the frame is malformed (DP_F_MALFORMED is set). */
int dp_parse(const uint8_t *frame, uint32_t len, struct dp_desc *d);

/* flowkey.c: the flow cache's key of each descriptor's frame (DP_FLOW_KEY_LEN bytes at
 * keys + k * DP_FLOW_KEY_LEN), its 64-bit hash, IP-level length, TCP flags and rx_ns, for the
 * k-th IP packet; returns how many.  A frame outside the arena, not IP or malformed is left
 * out. */
#define DP_FLOW_KEY_LEN 40
uint32_t dp_flow_keys(const uint8_t *arena, uint64_t arena_size, const struct dp_desc *d,
                      uint32_t n, uint8_t *keys, uint64_t *hash, uint32_t *ip_bytes,
                      uint8_t *tcp_flags, int64_t *rx_ns);
/* The flow table (columns t_*, entries 0..*used-1, `index` an open-addressing table of entry
 * numbers of mask + 1 >= 2 * capacity slots): packets which[j] (or j, without which) of
 * dp_flow_keys' output folded in, a new key taking a new entry; returns how many found the
 * table full, their numbers in missed. */
uint32_t dp_flow_fold(uint32_t n, const uint8_t *keys, const uint64_t *hash,
                      const uint32_t *ip_bytes, const uint8_t *tcp_flags, const int64_t *rx_ns,
                      const uint32_t *which, uint64_t *t_keys, uint64_t *t_hash,
                      int64_t *t_packets, int64_t *t_bytes, int64_t *t_first, int64_t *t_last,
                      uint8_t *t_flags, uint32_t *used, uint32_t capacity, int32_t *index,
                      uint32_t mask, uint32_t *missed);
/* The index again, from the entries' hashes (after entries were removed or moved). */
void dp_flow_reindex(const uint64_t *t_hash, uint32_t used, int32_t *index, uint32_t mask);

/* Run an io_uring worker (no DPDK: AF_PACKET or UDP sockets, multishot receive straight into
 * the ring slots) until arena->stop is set.  Same contract as dp_dpdk_worker_run. */
int dp_uring_worker_run(void *arena_base, const struct dp_worker_config *cfg);
/* cffi: end */

#endif
