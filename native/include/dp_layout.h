/* dp_layout.h: the shared-memory layout of a packet arena.
 *
 * This header is the only definition of the layout.  C workers include it; the Python side
 * describes the same structs with numpy dtypes and checks them against sizeof/offsetof of the
 * compiled structs (through cffi) every time it maps an arena.  Change anything here and bump
 * DP_LAYOUT_VERSION.
 *
 * One arena per worker, one file (hugetlbfs or /dev/shm, mode 0600):
 *
 *   0                 struct dp_arena        header, worker control, per-port counters
 *   rings_off         n_rings x ring_stride  struct dp_ring + ring_size x struct dp_desc
 *   slots_off         n_rings x ring_size x slot_size   copy-mode slots (slot i <-> ring pos i)
 *   pool_off          pool_len (2 MB aligned)   DPDK external heap: the mbuf pool lives here
 *
 * Only descriptors move.  A descriptor's `addr` is a byte offset into this file, so any process
 * that maps the arena can read the frame in place, whatever address it mapped it at.
 */
#ifndef DP_LAYOUT_H
#define DP_LAYOUT_H

#include <stdint.h>

/* cffi: begin */
#define DP_MAGIC          0x414e455241504455ull  /* "UDPARENA" little-endian */
#define DP_LAYOUT_VERSION 4u  /* 2: struct dp_uring_counters appended to dp_arena;
                                 3: dp_ring.claim; 4: struct dp_gen_stream_ctl appended */
#define DP_CLAIM_PID_BITS 22  /* pid_max is at most 2^22 (PID_MAX_LIMIT) */
#define DP_CACHE_LINE     64
#define DP_HUGE_PAGE      (2u << 20)
#define DP_MAX_PORTS      8
#define DP_MAX_RINGS      32
#define DP_ERR_LEN        256
#define DP_GEN_MAX_STREAMS 8      /* generator streams per worker */

/* Descriptor flags. */
#define DP_F_TRUNCATED    0x0001u /* frame longer than what was stored at addr */
#define DP_F_MALFORMED    0x0002u /* a header claimed more bytes than the frame has, or lied */
#define DP_F_VLAN         0x0004u /* one or more 802.1Q/802.1ad tags */
#define DP_F_IP_OPTIONS   0x0008u /* IPv4 IHL > 5 */
#define DP_F_IPV6_EXT     0x0010u /* IPv6 extension headers were walked */
#define DP_F_FRAGMENT     0x0020u /* non-first fragment: no L4 header */
#define DP_F_COPIED       0x0040u /* bytes were copied into a slot (not the NIC's own buffer) */
#define DP_F_GENERATED    0x0080u /* carries a dp_gen_trailer from our generator */

/* One packet.  32 bytes: two per cache line. */
struct dp_desc {
    uint64_t addr;      /* byte offset of the frame's first byte in the arena */
    uint64_t rx_ns;     /* CLOCK_REALTIME at receive, ns (one reading per burst) */
    uint32_t hash;      /* 5-tuple hash (0 when there is no L3/L4) */
    uint16_t len;       /* bytes stored at addr */
    uint16_t flags;     /* DP_F_* */
    uint16_t ethertype; /* innermost ethertype, host order */
    uint16_t port;      /* worker-local port index */
    uint8_t  queue;
    uint8_t  l4proto;   /* IPPROTO_* or 0 */
    uint16_t l4_off;    /* offset of the L4 header in the frame, 0 if none */
};

/* Counters of one (port, queue) ring: monotonic, single writer (the worker). */
struct dp_ring_counters {
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t ring_full_drops;   /* ring had no room: packet dropped, never a block */
    uint64_t malformed;
    uint64_t truncated;
    uint64_t copied;            /* packets copied into a slot (zero-copy unavailable) */
    uint64_t bursts;            /* non-empty RX bursts */
    uint64_t pad0;
};

/* An SPSC ring.  Indices run free (u64, never wrap in practice); position = index & mask.
 * prod is written only by the worker, cons only by the consumer; each sits on its own line. */
struct dp_ring {
    _Alignas(DP_CACHE_LINE) volatile uint64_t prod;
    _Alignas(DP_CACHE_LINE) volatile uint64_t cons;
    _Alignas(DP_CACHE_LINE) uint32_t size;   /* power of two */
    uint32_t mask;
    uint16_t port;
    uint16_t queue;
    uint32_t pad0;
    uint64_t slots_off;                        /* this ring's copy-mode slots */
    /* The one process consuming the ring: its start time << DP_CLAIM_PID_BITS | its pid, so a
     * reused pid is not taken for a dead claimant; 0: unclaimed.  One word: claimed and
     * taken over with a compare-and-swap (dp_ring_claim). */
    volatile uint64_t claim;
    _Alignas(DP_CACHE_LINE) struct dp_ring_counters c;
    _Alignas(DP_CACHE_LINE) struct dp_desc desc[];
};

/* Counters of one port: monotonic across worker restarts (the worker adds deltas). */
struct dp_port_counters {
    _Alignas(DP_CACHE_LINE) uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t tx_drops;          /* TX burst did not take the packet */
    uint64_t nic_missed;        /* dropped before the worker saw it: rte_eth_stats.imissed, plus
                                   the af_packet/af_xdp socket drops DPDK does not report */
    uint64_t nic_errors;        /* ierrors + oerrors */
    uint64_t rx_nombuf;         /* rte_eth_stats.rx_nombuf */
    uint64_t gen_seq;           /* next sequence number the generator will send */
    uint64_t pad0;
};

/* Counters of one ring that only the io_uring worker (uring_worker.c) has; zero under DPDK.
 * Indexed like the rings.  ENOBUFS is an event, not a drop: the packets wait in the socket, and
 * only what overflows the socket's buffer is lost (counted in the port's nic_missed). */
struct dp_uring_counters {
    uint64_t cqes;              /* receive completions reaped for this ring */
    uint64_t enobufs;           /* multishot receive ended with -ENOBUFS: every slot was held */
    uint64_t rearms;            /* multishot receive submitted again after it ended */
    uint64_t recv_errors;       /* other failed receive completions */
    uint64_t pad[4];
};

/* One generator stream's control and counters (layout version 4), indexed like the config's
 * streams.  rate_pps is the one field Python writes (dataplane/workers/rate.py): the worker
 * reads it every periodic tick, so a rate change keeps the stream's sequence space.  The rest
 * the worker writes; a restarted worker continues seq and issued. */
struct dp_gen_stream_ctl {
    volatile uint64_t rate_pps; /* the rate now, packets/s (0: as fast as the port takes them) */
    uint64_t cfg_rate_pps;      /* the config's rate the worker started with: a worker started
                                   with another one (a reload) takes it, a restart keeps rate_pps */
    uint64_t seq;               /* next sequence number: frames that carry the trailer */
    uint64_t issued;            /* frames built, trailer or not: the place in the size cycle */
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t tx_drops;
    uint64_t stream;            /* the id its trailers carry; 0: slot unused */
};

enum dp_worker_state {
    DP_W_EMPTY = 0, DP_W_STARTING = 1, DP_W_RUNNING = 2, DP_W_STOPPED = 3, DP_W_FAILED = 4,
};

struct dp_arena {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;        /* sizeof(struct dp_arena) */
    uint64_t arena_size;
    uint32_t n_ports;
    uint32_t n_rings;
    uint32_t ring_size;
    uint32_t slot_size;
    uint64_t rings_off;
    uint64_t ring_stride;
    uint64_t slots_off;
    uint64_t pool_off;
    uint64_t pool_len;
    uint32_t desc_size;          /* sizeof(struct dp_desc), for readers that only have bytes */
    uint32_t page_size;          /* page size of the backing file */

    /* Worker control: written by the worker except `stop` (supervisor) and `restarts`. */
    _Alignas(DP_CACHE_LINE) volatile uint64_t heartbeat_ns;  /* CLOCK_MONOTONIC, ~every 10 ms */
    volatile uint32_t state;      /* enum dp_worker_state */
    volatile uint32_t stop;       /* supervisor sets 1: finish the loop and exit */
    volatile int32_t  pid;
    uint32_t zero_copy;           /* 1: descriptors point into NIC mbufs in the pool */
    uint64_t restarts;            /* supervisor: times this worker was started again */
    uint64_t loops;               /* poll-loop iterations */
    uint64_t busy_cycles;         /* TSC cycles in iterations that moved packets */
    uint64_t total_cycles;        /* TSC cycles in the loop */
    char     error[DP_ERR_LEN];   /* why the worker failed, NUL-terminated */

    struct dp_port_counters port[DP_MAX_PORTS];
    _Alignas(DP_CACHE_LINE) struct dp_uring_counters uring[DP_MAX_RINGS];   /* version 2 */
    _Alignas(DP_CACHE_LINE) struct dp_gen_stream_ctl gen[DP_GEN_MAX_STREAMS];  /* version 4 */
};

/* Written by our generator at the very end of every frame, so a reader finds it at
 * addr + len - sizeof(trailer) whatever headers came before. */
#define DP_GEN_MAGIC 0x31475044u /* "DPG1" */
struct dp_gen_trailer {
    uint64_t seq;
    uint64_t tx_ns;     /* CLOCK_REALTIME at TX */
    uint32_t stream;    /* generator's stream id */
    uint32_t magic;
} __attribute__((packed));

/* A TCP transport process (native/transport.c): its control block and counters, in a small
 * file of its own (/dev/shm/dataplane-transport-NAME, 0600).  Not in struct dp_arena: the
 * sender is a consumer of another worker's arena and must not write that worker's header, and
 * a file of its own keeps the counters across restarts of either side without a new arena
 * layout.  It has its own version; struct dp_arena (DP_LAYOUT_VERSION) is unchanged. */
#define DP_TRANSPORT_MAGIC   0x3154524e41525444ull  /* "DTRANRT1" little-endian */
#define DP_TRANSPORT_VERSION 3u  /* 3: struct dp_auth_counters */

struct dp_transport_counters {
    uint64_t batches;            /* send: batches sent whole; recv: batches published */
    uint64_t packets;            /* descriptors in those batches */
    uint64_t bytes;              /* frame bytes in those batches */
    uint64_t completions;        /* send: zero-copy completions (one per send call) */
    uint64_t copied_completions; /* ... of which the kernel reported it copied anyway */
    uint64_t reconnects;         /* send: connections after the first; recv: accepts after it */
    uint64_t lost_batches;       /* send: consumed from the ring, never acknowledged */
    uint64_t lost_packets;       /* descriptors in the lost batches */
    uint64_t bad_frames;         /* recv: header or descriptors failed validation */
    uint64_t short_reads;        /* recv: the peer went away in the middle of a frame */
    uint64_t acks;               /* send: batches acknowledged; recv: acks sent */
    uint64_t ring_waits;         /* recv: frames that waited for ring room (TCP backpressure) */
    uint64_t disconnects;        /* connections that ended (either side, any reason) */
    uint64_t last_session;       /* recv: session and seq of the last batch published, sent */
    uint64_t last_seq;           /*   to every new sender so it knows what arrived */
    uint64_t slow_peers;         /* recv: peers dropped for not taking acks in time */
};

/* The connection handshake (dataplane/transport/auth.py, Python, both kinds of transport):
 * failures[i] counts reason i of auth.REASONS; insecure is 1 when the transport runs without a
 * key (config `insecure = true`), for the metrics and `status`. */
#define DP_AUTH_REASONS 8
struct dp_auth_counters {
    uint64_t ok;                 /* handshakes a peer passed */
    uint64_t failures[DP_AUTH_REASONS];
    uint32_t insecure;
    uint32_t pad0;
};

/* What an RDMA transport (dataplane/transport/rdma/process.py, Python) adds to the counters
 * above: its QP, credits and memory-registration cache, for the scrape and `dataplane status`.
 * Gauges are marked; the rest only grow.  The histogram's bounds are SECONDS_BUCKETS of
 * dataplane/transport/rdma/mr_cache.py. */
#define DP_MR_BUCKETS 8
struct dp_rdma_counters {
    uint64_t wc_errors;          /* work completions with an error status */
    uint64_t peer_errors;        /* peer gone, failed post, completion timeout, bad batch */
    uint64_t credit_waits;       /* send: stalls at zero credits */
    uint64_t credits;            /* gauge.  send: positions it may write; recv: free positions */
    uint64_t credit_updates;     /* recv: consumer indexes sent back; send: received */
    uint64_t qps;                /* gauge: queue pairs open */
    uint64_t max_qp;             /* gauge: the device's limit */
    uint64_t mr_hits;
    uint64_t mr_misses;
    uint64_t mr_evictions;
    uint64_t mr_registered_bytes;  /* gauge */
    uint64_t mr_budget_bytes;      /* gauge: from RLIMIT_MEMLOCK */
    uint64_t mr_reg_count;
    uint64_t mr_reg_ns;            /* time spent in ibv_reg_mr */
    uint64_t bad_descriptors;      /* recv: staged descriptors refused (len, flags) */
    uint64_t mr_reg_buckets[DP_MR_BUCKETS];  /* registrations per bound (not cumulative) */
    uint64_t pad[1];
};

struct dp_transport {
    uint64_t magic;
    uint32_t version;
    uint32_t size;               /* sizeof(struct dp_transport) */
    _Alignas(DP_CACHE_LINE) volatile uint64_t heartbeat_ns;  /* CLOCK_MONOTONIC, ~10 ms */
    volatile uint32_t state;     /* enum dp_worker_state */
    volatile uint32_t stop;      /* supervisor sets 1 */
    volatile int32_t  pid;
    uint32_t connected;          /* 1 while a peer connection is up */
    uint64_t restarts;           /* supervisor: times this process was started again */
    char     error[DP_ERR_LEN];
    _Alignas(DP_CACHE_LINE) struct dp_transport_counters c;
    _Alignas(DP_CACHE_LINE) struct dp_rdma_counters r;   /* RDMA transports only */
    _Alignas(DP_CACHE_LINE) struct dp_auth_counters auth;
};

/* cffi: end */

#endif
