/* tpacket_rx: the TPACKET_V3 baseline receiver for perf/ingest_vs_recvmmsg.py.  AF_PACKET with
 * a mapped V3 RX ring (64 blocks of 1 MB, 10 ms block timeout) on IFACE, poll() for a block, walk
 * its frames, hand it back, for SECONDS; prints "packets N bytes B cpu_ns C" (getrusage). */
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include "rx_baseline.h"

#define NBLK 64
#define BLK (1 << 20)

int main(int argc, char **argv)
{
    if (baseline_args(argc, argv))
        return 1;
    int fd = socket(AF_PACKET, SOCK_RAW, 0), v = TPACKET_V3, one = 1;
    setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof(v));
    setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one));
    struct tpacket_req3 req = { .tp_block_size = BLK, .tp_block_nr = NBLK, .tp_frame_size = 2048,
                                .tp_frame_nr = BLK / 2048 * NBLK, .tp_retire_blk_tov = 10 };
    if (setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)) < 0) {
        perror("PACKET_RX_RING");
        return 1;
    }
    unsigned char *ring = mmap(NULL, (size_t)BLK * NBLK, PROT_READ | PROT_WRITE, MAP_SHARED,
                               fd, 0);
    struct sockaddr_ll ll = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                              .sll_ifindex = (int)if_nametoindex(argv[1]) };
    if (ring == MAP_FAILED || ll.sll_ifindex == 0 ||
        bind(fd, (struct sockaddr *)&ll, sizeof(ll)) < 0) {
        perror("mmap/bind");
        return 1;
    }
    unsigned long long pkts = 0, bytes = 0;
    unsigned blk = 0;
    double end = now_s() + atof(argv[2]);
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    while (now_s() < end) {
        struct tpacket_block_desc *b = (void *)(ring + (size_t)blk * BLK);
        if (!(__atomic_load_n(&b->hdr.bh1.block_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER)) {
            poll(&pfd, 1, 100);
            continue;
        }
        struct tpacket3_hdr *h = (void *)((unsigned char *)b + b->hdr.bh1.offset_to_first_pkt);
        for (unsigned i = 0; i < b->hdr.bh1.num_pkts; i++) {
            bytes += h->tp_snaplen;
            h = (void *)((unsigned char *)h + h->tp_next_offset);
        }
        pkts += b->hdr.bh1.num_pkts;
        __atomic_store_n(&b->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        blk = (blk + 1) % NBLK;
    }
    baseline_report(pkts, bytes);
    return 0;
}
