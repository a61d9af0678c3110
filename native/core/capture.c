/* capture.c: live capture's BPF filter over a batch of descriptors (dp_capture.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pcap/pcap.h>

#include "dp_capture.h"

struct dp_bpf {
    struct bpf_program prog;
};

struct dp_bpf *dp_bpf_compile(const char *filter, uint32_t snaplen, char *err, size_t err_len)
{
    pcap_t *p = pcap_open_dead(DLT_EN10MB, (int)(snaplen ? snaplen : 262144));
    if (p == NULL) {
        snprintf(err, err_len, "libpcap: pcap_open_dead failed");
        return NULL;
    }
    struct dp_bpf *f = calloc(1, sizeof(*f));
    if (f == NULL) {
        snprintf(err, err_len, "out of memory");
        pcap_close(p);
        return NULL;
    }
    /* optimize = 1, as tcpdump does; the netmask only matters to "ip broadcast" */
    if (pcap_compile(p, &f->prog, filter, 1, PCAP_NETMASK_UNKNOWN) != 0) {
        snprintf(err, err_len, "%s", pcap_geterr(p));
        free(f);
        pcap_close(p);
        return NULL;
    }
    pcap_close(p);
    return f;
}

void dp_bpf_free(struct dp_bpf *f)
{
    if (f == NULL)
        return;
    pcap_freecode(&f->prog);
    free(f);
}

uint32_t dp_bpf_len(const struct dp_bpf *f)
{
    return f->prog.bf_len;
}

/* addr + len inside [0, size), computed without overflow */
static int inside(uint64_t addr, uint64_t len, uint64_t size)
{
    return addr <= size && len <= size - addr;
}

uint32_t dp_bpf_match(const struct dp_bpf *f, const uint8_t *base, uint64_t size,
                      const struct dp_desc *desc, uint32_t n, uint32_t snaplen,
                      uint32_t *idx, uint32_t *caplen, uint32_t *bad)
{
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++) {
        /* one read of each field: the writer is another process */
        uint64_t addr = __atomic_load_n(&desc[i].addr, __ATOMIC_RELAXED);
        uint32_t len = __atomic_load_n(&desc[i].len, __ATOMIC_RELAXED);
        if (!inside(addr, len, size)) {
            (*bad)++;
            continue;
        }
        /* wirelen = buflen = the stored length: a truncated frame's original length is not
         * kept (DP_F_TRUNCATED says it was longer), so the filter sees what is there */
        if (bpf_filter(f->prog.bf_insns, base + addr, len, len) == 0)
            continue;
        idx[m] = i;
        caplen[m] = snaplen && len > snaplen ? snaplen : len;
        m++;
    }
    return m;
}

uint64_t dp_bpf_copy(const uint8_t *base, uint64_t size, const struct dp_desc *desc,
                     const uint32_t *idx, const uint32_t *caplen, uint32_t m,
                     uint8_t *out, uint64_t out_len)
{
    uint64_t used = 0;
    for (uint32_t i = 0; i < m; i++) {
        uint64_t len = caplen[i];
        if (len > out_len - used)
            break;
        uint64_t addr = __atomic_load_n(&desc[idx[i]].addr, __ATOMIC_RELAXED);
        if (inside(addr, len, size))
            memcpy(out + used, base + addr, len);
        else
            memset(out + used, 0, len);
        used += len;
    }
    return used;
}
