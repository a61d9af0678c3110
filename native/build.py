"""cffi build of dataplane._native: the layout, the parser and the workers, in one module.

Run by setuptools at install time (cffi_modules in setup.py), or by hand:
    python native/build.py
"""

import shutil
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["arena.c", "parse.c", "dpdk_port.c", "dpdk_worker.c", "kernel_drops.c", "ring_bench.c"]
SOURCES += ["gen.c", "uring_sock.c", "uring_worker.c"]   # io_uring worker (native/dp_uring.h)
SOURCES += ["transport.c", "transport_send.c"]   # TCP transport (native/dp_transport.h)

CDEF = """
#define DP_LAYOUT_VERSION ...
#define DP_MAGIC ...
#define DP_MAX_PORTS ...
#define DP_MAX_RINGS ...
#define DP_ERR_LEN ...
#define DP_GEN_MAGIC ...
#define DP_F_TRUNCATED ...
#define DP_F_MALFORMED ...
#define DP_F_VLAN ...
#define DP_F_IP_OPTIONS ...
#define DP_F_IPV6_EXT ...
#define DP_F_FRAGMENT ...
#define DP_F_COPIED ...
#define DP_F_GENERATED ...
#define DP_TMPL_MAX ...
#define DP_NAME_LEN ...
#define DP_EAL_ARGS ...
#define DP_CSUM_NONE ...
enum dp_worker_state { DP_W_EMPTY, DP_W_STARTING, DP_W_RUNNING, DP_W_STOPPED, DP_W_FAILED, ... };
#define DP_CSUM_L4 ...

struct dp_desc {
    uint64_t addr; uint64_t rx_ns; uint32_t hash; uint16_t len; uint16_t flags;
    uint16_t ethertype; uint16_t port; uint8_t queue; uint8_t l4proto; uint16_t l4_off;
    ...;
};
struct dp_ring_counters {
    uint64_t rx_packets; uint64_t rx_bytes; uint64_t ring_full_drops; uint64_t malformed;
    uint64_t truncated; uint64_t copied; uint64_t bursts;
    ...;
};
struct dp_ring {
    uint64_t prod; uint64_t cons; uint32_t size; uint32_t mask; uint16_t port; uint16_t queue;
    uint64_t slots_off; struct dp_ring_counters c;
    ...;
};
struct dp_port_counters {
    uint64_t tx_packets; uint64_t tx_bytes; uint64_t tx_drops; uint64_t nic_missed;
    uint64_t nic_errors; uint64_t rx_nombuf; uint64_t gen_seq;
    ...;
};
struct dp_uring_counters { uint64_t cqes; uint64_t enobufs; uint64_t rearms; uint64_t recv_errors;
                           ...; };
struct dp_arena {
    uint64_t magic; uint32_t version; uint32_t header_size; uint64_t arena_size;
    uint32_t n_ports; uint32_t n_rings; uint32_t ring_size; uint32_t slot_size;
    uint64_t rings_off; uint64_t ring_stride; uint64_t slots_off; uint64_t pool_off;
    uint64_t pool_len; uint32_t desc_size; uint32_t page_size;
    uint64_t heartbeat_ns; uint32_t state; uint32_t stop; int32_t pid; uint32_t zero_copy;
    uint64_t restarts; uint64_t loops; uint64_t busy_cycles; uint64_t total_cycles;
    char error[];
    struct dp_port_counters port[];
    struct dp_uring_counters uring[];
    ...;
};
struct dp_gen_trailer { uint64_t seq; uint64_t tx_ns; uint32_t stream; uint32_t magic; ...; };

struct dp_port_config { char name[]; uint16_t n_rxq; uint16_t n_txq; uint16_t rxd; uint16_t txd;
                        char iface[]; uint16_t udp_port; ...; };
struct dp_gen_config {
    uint32_t enabled; uint16_t port; uint16_t queue; uint32_t stream; uint32_t burst;
    uint64_t rate_pps; uint64_t count; uint16_t tmpl_len; uint16_t vary_off; uint16_t vary_min;
    uint16_t vary_max; uint16_t csum; uint8_t tmpl[];
    ...;
};
struct dp_worker_config {
    uint32_t worker_id; uint32_t n_ports; struct dp_port_config port[]; struct dp_gen_config gen;
    uint32_t burst; uint32_t n_mbufs; uint32_t zero_copy; uint32_t idle_sleep_us;
    uint32_t copybreak; int32_t eal_argc;
    const char *eal_argv[];
    ...;
};

void *dp_arena_map(const char *path, uint64_t *len_out);
int dp_arena_unmap(void *base, uint64_t len);
int dp_arena_layout(struct dp_arena *a, uint32_t n_ports, uint32_t n_rings, uint32_t ring_size,
                    uint32_t slot_size, uint64_t pool_len);
void dp_arena_format(void *base, const struct dp_arena *layout, const uint16_t *ring_port,
                     const uint16_t *ring_queue);
struct dp_ring *dp_arena_ring(void *base, uint32_t i);
int dp_ring_wait_drained(void *base, uint32_t i, uint32_t seconds, uint64_t *left);
uint64_t dp_ring_load_prod(const struct dp_ring *r);
void dp_ring_store_cons(struct dp_ring *r, uint64_t cons);
void dp_ring_store_prod(struct dp_ring *r, uint64_t prod);
int dp_parse(const uint8_t *frame, uint32_t len, struct dp_desc *d);
int dp_dpdk_worker_run(void *arena_base, const struct dp_worker_config *cfg);
int dp_uring_worker_run(void *arena_base, const struct dp_worker_config *cfg);

/* native/dp_transport.h: TCP transport, zero-copy send, its control file */
#define DP_TRANSPORT_MAGIC ...
#define DP_TRANSPORT_VERSION ...
#define DP_TW_MAX_BATCH ...
#define DP_TM_COPY ...
#define DP_TM_ZEROCOPY ...
#define DP_TM_SEND_ZC ...
struct dp_transport_counters {
    uint64_t batches; uint64_t packets; uint64_t bytes; uint64_t completions;
    uint64_t copied_completions; uint64_t reconnects; uint64_t lost_batches;
    uint64_t lost_packets; uint64_t bad_frames; uint64_t short_reads; uint64_t acks;
    uint64_t ring_waits; uint64_t disconnects; uint64_t last_session; uint64_t last_seq;
    ...;
};
#define DP_MR_BUCKETS ...
struct dp_rdma_counters {
    uint64_t wc_errors; uint64_t peer_errors; uint64_t credit_waits; uint64_t credits;
    uint64_t credit_updates; uint64_t qps; uint64_t max_qp; uint64_t mr_hits; uint64_t mr_misses;
    uint64_t mr_evictions; uint64_t mr_registered_bytes; uint64_t mr_budget_bytes;
    uint64_t mr_reg_count; uint64_t mr_reg_ns; uint64_t mr_reg_buckets[];
    ...;
};
struct dp_transport {
    uint64_t magic; uint32_t version; uint32_t size; uint64_t heartbeat_ns; uint32_t state;
    uint32_t stop; int32_t pid; uint32_t connected; uint64_t restarts; char error[];
    struct dp_transport_counters c; struct dp_rdma_counters r;
    ...;
};
struct dp_transport_config {
    char name[]; char host[]; uint16_t tcp_port; uint16_t mode; uint16_t port_index;
    uint32_t max_batch; uint32_t max_bytes; uint32_t max_inflight; uint32_t backoff_min_ms;
    uint32_t backoff_max_ms; uint64_t session;
    ...;
};
int dp_transport_send_run(void *arena_base, uint32_t ring, struct dp_transport *t,
                          const struct dp_transport_config *cfg);
int dp_transport_recv_run(void *arena_base, uint32_t ring, struct dp_transport *t,
                          const struct dp_transport_config *cfg);
uint64_t dp_transport_produce(void *arena_base, uint32_t ring, uint64_t n, uint32_t frame_len,
                              uint32_t burst, uint32_t stream);

/* native/ring_bench.h: test producer/consumer, not used by workers */
uint64_t dp_bench_produce(void *arena_base, uint32_t ring, uint64_t n, uint32_t burst);
uint32_t dp_bench_try_produce(void *arena_base, uint32_t ring, uint32_t n);
uint64_t dp_bench_consume(void *arena_base, uint32_t ring, uint64_t n, uint32_t batch);
"""


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        raise SystemExit("pkg-config not found: run scripts/bootstrap.sh (installs libdpdk-dev)")
    out = subprocess.run(["pkg-config", *args, "libdpdk"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pkg-config libdpdk failed ({out.stderr.strip()}): "
                         "run scripts/bootstrap.sh (installs libdpdk-dev)")
    return out.stdout.split()


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_cflags = _pkg_config("--cflags")
ffibuilder.set_source(
    "dataplane._native",
    '#include "dp_ring.h"\n#include "dp_worker.h"\n#include "ring_bench.h"\n'
    '#include "dp_transport.h"\n',
    sources=[f"native/{s}" for s in SOURCES],  # relative: setuptools insists
    include_dirs=["native"],
    extra_compile_args=[*_cflags, "-O2", "-g", "-Wall", "-Wextra", "-Werror",
                        "-Wno-unused-parameter"],
    extra_link_args=[*_pkg_config("--libs"), "-luring"],
)

if __name__ == "__main__":
    import os

    os.chdir(HERE.parent)
    ffibuilder.compile(tmpdir=".", verbose=True)
