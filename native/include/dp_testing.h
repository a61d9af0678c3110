/* ring_bench.h: a test producer and consumer for the descriptor ring (native/ring_bench.c).
 * Not used by the workers; exposed through cffi for tests/test_ring.py and perf/. */
#ifndef RING_BENCH_H
#define RING_BENCH_H

#include <stdint.h>

/* Push n descriptors, spinning while the ring is full; returns how often it found it full. */
uint64_t dp_bench_produce(void *arena_base, uint32_t ring, uint64_t n, uint32_t burst);
/* Push up to n without waiting, as a worker would; returns how many went in. */
uint32_t dp_bench_try_produce(void *arena_base, uint32_t ring, uint32_t n);
/* Drain n descriptors in batches of at most batch; returns the sum of their len. */
uint64_t dp_bench_consume(void *arena_base, uint32_t ring, uint64_t n, uint32_t batch);

#endif
