/* rx_baseline.h: what the two baseline receivers of perf/ingest_vs_recvmmsg.py share (the
 * command line, the clock, the closing line the script parses), so they differ only in how
 * they receive. */
#ifndef RX_BASELINE_H
#define RX_BASELINE_H

#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* argv: PROG IFACE SECONDS; 0 when it is that, else usage printed */
static int baseline_args(int argc, char **argv)
{
    if (argc == 3)
        return 0;
    fprintf(stderr, "usage: %s IFACE SECONDS\n", argv[0]);
    return 1;
}

/* "packets N bytes B cpu_ns C", C from getrusage: user + system time of this process */
static void baseline_report(unsigned long long pkts, unsigned long long bytes)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    unsigned long long cpu = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000ull +
                             (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000ull;
    printf("packets %llu bytes %llu cpu_ns %llu\n", pkts, bytes, cpu);
}

#endif
