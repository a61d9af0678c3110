/* recvmmsg_rx: the plain baseline receiver for perf/ingest_vs_recvmmsg.py.  AF_PACKET SOCK_RAW
 * (ETH_P_ALL, incoming only) on IFACE, recvmmsg() in batches of 64 into private buffers, for
 * SECONDS; prints "packets N bytes B cpu_ns C" (getrusage: user + system time). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <sys/socket.h>
#include "rx_baseline.h"

#define BATCH 64
#define SNAP 2048

int main(int argc, char **argv)
{
    if (baseline_args(argc, argv))
        return 1;
    int fd = socket(AF_PACKET, SOCK_RAW, 0), one = 1, rb = 4 << 20;
    struct sockaddr_ll ll = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                              .sll_ifindex = (int)if_nametoindex(argv[1]) };
    setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rb, sizeof(rb));
    if (fd < 0 || ll.sll_ifindex == 0 || bind(fd, (struct sockaddr *)&ll, sizeof(ll)) < 0) {
        perror("socket/bind");
        return 1;
    }
    struct timeval tv = { .tv_usec = 100000 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    static char buf[BATCH][SNAP];
    struct iovec iov[BATCH];
    struct mmsghdr m[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i] = (struct iovec){ buf[i], SNAP };
        m[i].msg_hdr = (struct msghdr){ .msg_iov = &iov[i], .msg_iovlen = 1 };
    }
    unsigned long long pkts = 0, bytes = 0;
    double end = now_s() + atof(argv[2]);
    while (now_s() < end) {
        int n = recvmmsg(fd, m, BATCH, MSG_WAITFORONE, NULL);
        for (int i = 0; i < n; i++)
            bytes += m[i].msg_len;
        if (n > 0)
            pkts += (unsigned)n;
    }
    baseline_report(pkts, bytes);
    return 0;
}
