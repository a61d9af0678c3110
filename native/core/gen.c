/* gen.c: the generator's frame rules and pacing (dp_gen.h), without DPDK, so the DPDK worker
 * and the io_uring worker send identical frames.  The checksums compute what DPDK's
 * rte_ipv4_cksum / rte_ipv4_udptcp_cksum / rte_ipv6_udptcp_cksum compute: the ones' complement
 * sum is byte-order independent, so summing native 16-bit words and storing the result as is
 * gives the network-order checksum. */
#include <stdio.h>
#include <string.h>

#include "dp_gen.h"

#define IPPROTO_UDP_ 17
#define IPPROTO_TCP_ 6

/* Where the IP header of the template is, for per-packet checksums: after Ethernet and any
 * VLAN tags, IPv4 or IPv6 with UDP/TCP right after the fixed header.  0 when it is not that. */
static uint32_t gen_l3_off(const uint8_t *f, uint32_t len)
{
    uint32_t off = 12;
    while (off + 2 <= len) {
        uint16_t et = (uint16_t)(f[off] << 8 | f[off + 1]);
        off += 2;
        if (et == 0x8100 || et == 0x88a8) {
            off += 2;
            continue;
        }
        if (et == 0x0800 && off + 20 <= len && (f[off + 9] == IPPROTO_UDP_ ||
                                                f[off + 9] == IPPROTO_TCP_))
            return off;
        if (et == 0x86dd && off + 40 <= len && (f[off + 6] == IPPROTO_UDP_ ||
                                                f[off + 6] == IPPROTO_TCP_))
            return off;
        return 0;
    }
    return 0;
}

int dp_gen_prepare(struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t max_len,
                   uint32_t max_burst, uint64_t hz, uint64_t now, char *why, size_t why_len)
{
    memset(g, 0, sizeof(*g));
    uint32_t lim = max_len < DP_TMPL_MAX ? max_len : DP_TMPL_MAX;
    if (gc->tmpl_len < 14u + DP_GEN_TRAILER || gc->tmpl_len > lim) {
        snprintf(why, why_len, "generator: template of %u bytes, need %u..%u", gc->tmpl_len,
                 14 + DP_GEN_TRAILER, lim);
        return -1;
    }
    if (gc->vary_off && (gc->vary_off + 2u > (uint32_t)gc->tmpl_len - DP_GEN_TRAILER ||
                         gc->vary_max < gc->vary_min)) {
        snprintf(why, why_len, "generator: vary field at %u (%u..%u) outside the %u-byte "
                 "frame's headers, or max < min", gc->vary_off, gc->vary_min, gc->vary_max,
                 gc->tmpl_len);
        return -1;
    }
    g->l3_off = gen_l3_off(gc->tmpl, gc->tmpl_len);
    if (gc->csum == DP_CSUM_L4 && g->l3_off == 0) {
        snprintf(why, why_len, "generator: csum=L4 needs an IPv4/IPv6 template with UDP or TCP");
        return -1;
    }
    g->burst = gc->burst < 1 ? 1 : gc->burst > max_burst ? max_burst : gc->burst;
    g->len = gc->tmpl_len;
    g->vary_off = gc->vary_off;
    g->vary_range = (uint32_t)gc->vary_max - gc->vary_min + 1;
    g->csum = gc->csum;
    g->hz = hz;
    /* Catch-up allowed after the loop was late (an idle nap, preemption): 5 ms worth, at least
     * two bursts.  Less and a descheduled generator falls short of its rate for good. */
    uint64_t five_ms = gc->rate_pps / 200;
    g->cap = (five_ms > (uint64_t)g->burst * 2 ? five_ms : (uint64_t)g->burst * 2) * hz;
    g->last = now;
    return 0;
}

uint32_t dp_gen_due(struct dp_gen_state *g, const struct dp_gen_config *gc, uint64_t now)
{
    uint64_t n = g->burst;
    if (gc->rate_pps) {
        uint64_t dt = now - g->last < g->hz ? now - g->last : g->hz;
        g->last = now;
        g->credit += dt * gc->rate_pps;
        if (g->credit > g->cap)
            g->credit = g->cap;
        if (n > g->credit / g->hz)
            n = g->credit / g->hz;
    }
    if (gc->count && n > gc->count - g->sent)
        n = gc->count - g->sent;
    return (uint32_t)n;
}

int dp_gen_took(struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t k)
{
    g->sent += k;
    if (gc->rate_pps)
        g->credit -= (uint64_t)k * g->hz;
    return gc->count && g->sent >= gc->count;
}

static uint32_t sum16(const uint8_t *p, uint32_t len, uint32_t sum)
{
    uint16_t w;
    for (; len >= 2; p += 2, len -= 2) {
        memcpy(&w, p, 2);
        sum += w;
    }
    if (len) {   /* the odd byte is the high-order byte of a zero-padded big-endian word */
        w = 0;
        memcpy(&w, p, 1);
        sum += w;
    }
    return sum;
}

static uint16_t fold(uint32_t sum)
{
    sum = (sum >> 16) + (sum & 0xffff);
    sum += sum >> 16;
    return (uint16_t)sum;
}

/* The L4 checksum over pseudo header + L4 bytes; UDP sends 0 as 0xffff (0 means "none"). */
static void gen_l4_csum(uint8_t *l4, uint32_t l4_len, uint8_t proto, uint32_t phdr_sum)
{
    uint8_t *ck = l4 + (proto == IPPROTO_UDP_ ? 6 : 16);
    memset(ck, 0, 2);
    uint16_t v = (uint16_t)~fold(sum16(l4, l4_len, phdr_sum));
    if (v == 0 && proto == IPPROTO_UDP_)
        v = 0xffff;
    memcpy(ck, &v, 2);
}

static void gen_csum(uint8_t *l3)
{
    if ((l3[0] >> 4) == 4) {
        uint32_t ihl = (uint32_t)(l3[0] & 0xf) * 4;
        uint32_t l4_len = (uint32_t)(l3[2] << 8 | l3[3]) - ihl;   /* from the IP length */
        memset(l3 + 10, 0, 2);
        uint16_t v = (uint16_t)~fold(sum16(l3, ihl, 0));
        memcpy(l3 + 10, &v, 2);
        uint8_t ph[12];
        memcpy(ph, l3 + 12, 8);                 /* src, dst */
        ph[8] = 0;
        ph[9] = l3[9];
        ph[10] = (uint8_t)(l4_len >> 8);
        ph[11] = (uint8_t)l4_len;
        gen_l4_csum(l3 + ihl, l4_len, l3[9], sum16(ph, sizeof(ph), 0));
    } else {
        uint32_t l4_len = (uint32_t)(l3[4] << 8 | l3[5]);          /* payload length */
        uint8_t ph[40] = {0};
        memcpy(ph, l3 + 8, 32);                 /* src, dst */
        ph[34] = (uint8_t)(l4_len >> 8);
        ph[35] = (uint8_t)l4_len;
        ph[39] = l3[6];
        gen_l4_csum(l3 + 40, l4_len, l3[6], sum16(ph, sizeof(ph), 0));
    }
}

void dp_gen_fill(const struct dp_gen_state *g, const struct dp_gen_config *gc, uint8_t *f,
                 uint64_t seq, uint64_t ns)
{
    memcpy(f, gc->tmpl, g->len);
    if (g->vary_off) {
        uint16_t v = (uint16_t)(gc->vary_min + seq % g->vary_range);
        f[g->vary_off] = (uint8_t)(v >> 8);
        f[g->vary_off + 1] = (uint8_t)v;
    }
    struct dp_gen_trailer t = { .seq = seq, .tx_ns = ns, .stream = gc->stream,
                                .magic = DP_GEN_MAGIC };
    memcpy(f + g->len - DP_GEN_TRAILER, &t, sizeof(t));
    if (g->csum == DP_CSUM_L4)
        gen_csum(f + g->l3_off);
}
