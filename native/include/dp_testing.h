/* dp_testing.h: test producers and a consumer for the descriptor ring (native/testing/), in the
 * extension dataplane._testing that only development builds carry (DATAPLANE_TESTING=1, as
 * scripts/bootstrap.sh builds it).  Not used by the workers; for tests/ and perf/. */
#ifndef DP_TESTING_H
#define DP_TESTING_H

#include <stdint.h>

/* cffi: begin */
/* ring_bench.c: push n descriptors, spinning while the ring is full; returns how often it found
 * it full. */
uint64_t dp_bench_produce(void *arena_base, uint32_t ring, uint64_t n, uint32_t burst);
/* Push up to n without waiting, as a worker would; returns how many went in. */
uint32_t dp_bench_try_produce(void *arena_base, uint32_t ring, uint32_t n);
/* Drain n descriptors in batches of at most batch; returns the sum of their len. */
uint64_t dp_bench_consume(void *arena_base, uint32_t ring, uint64_t n, uint32_t batch);

/* transport_produce.c: n frames of frame_len bytes on ring `ring`, each ending in a
 * dp_gen_trailer whose seq is the ring index (waits for room, like dp_bench_produce).  Returns
 * n produced. */
uint64_t dp_transport_produce(void *arena_base, uint32_t ring, uint64_t n, uint32_t frame_len,
                              uint32_t burst, uint32_t stream);
/* cffi: end */

#endif
