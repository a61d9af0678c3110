#include "dp_worker.h"
int dp_dpdk_worker_run(void *arena_base, const struct dp_worker_config *cfg) { (void)arena_base; (void)cfg; return -1; }
