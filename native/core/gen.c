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

/* Where the L4 header starts and the payload begins (hdr_len), for a template with l3_off;
 * -1 when the headers do not fit in its len bytes. */
static int gen_l4(const uint8_t *f, uint32_t len, uint32_t l3_off, uint32_t *l4_off,
                  uint32_t *hdr_len)
{
    const uint8_t *l3 = f + l3_off;
    int v4 = (l3[0] >> 4) == 4;
    *l4_off = l3_off + (v4 ? (uint32_t)(l3[0] & 0xf) * 4 : 40);
    if (*l4_off + 20 > len)
        return -1;
    uint8_t proto = v4 ? l3[9] : l3[6];
    *hdr_len = *l4_off + (proto == IPPROTO_UDP_ ? 8 : (uint32_t)(f[*l4_off + 12] >> 4) * 4);
    return *hdr_len <= len ? 0 : -1;
}

/* The token bucket's catch-up allowed after the loop was late (an idle nap, preemption): 5 ms
 * worth, at least two bursts.  Less and a descheduled generator falls short of its rate. */
static void gen_set_rate(struct dp_gen_state *g, struct dp_gen_stream_state *s, uint64_t rate)
{
    uint64_t five_ms = rate / 200;
    s->rate = rate;
    s->cap = (five_ms > (uint64_t)g->burst * 2 ? five_ms : (uint64_t)g->burst * 2) * g->hz;
    if (s->credit > s->cap)
        s->credit = s->cap;
}

/* A capture's frames: each within the limit with its trailer; the longest is s->len. */
static int gen_check_pcap(struct dp_gen_stream_state *s, const struct dp_gen_stream_config *sc,
                          uint32_t lim, char *why, size_t why_len)
{
    if (!sc->frames || !sc->frame_off || !sc->frame_len || !sc->gap_ns || !sc->trail ||
        sc->frame_max > lim) {
        snprintf(why, why_len, "generator stream %u: a capture's frames up to %u bytes, the "
                 "limit is %u", sc->stream, sc->frame_max, lim);
        return -1;
    }
    for (uint32_t k = 0; k < sc->n_frames; k++)
        if (sc->frame_len[k] < 14 || sc->frame_len[k] + (sc->trail[k] ? DP_GEN_TRAILER : 0u) >
                                         sc->frame_max) {
            snprintf(why, why_len, "generator stream %u: capture frame %u of %u bytes, need "
                     "14..%u with its trailer", sc->stream, k, sc->frame_len[k], sc->frame_max);
            return -1;
        }
    s->len = sc->frame_max;
    return 0;
}

static int gen_check_stream(struct dp_gen_stream_state *s, const struct dp_gen_stream_config *sc,
                            uint32_t lim, char *why, size_t why_len)
{
    if (sc->n_frames)
        return gen_check_pcap(s, sc, lim, why, why_len);
    if (sc->tmpl_len < 14u + DP_GEN_TRAILER || sc->tmpl_len > lim) {
        snprintf(why, why_len, "generator stream %u: template of %u bytes, need %u..%u",
                 sc->stream, sc->tmpl_len, 14 + DP_GEN_TRAILER, lim);
        return -1;
    }
    s->len = sc->tmpl_len;
    s->l3_off = gen_l3_off(sc->tmpl, sc->tmpl_len);
    s->hdr_len = 14;
    if (s->l3_off && gen_l4(sc->tmpl, sc->tmpl_len, s->l3_off, &s->l4_off, &s->hdr_len) < 0)
        s->l3_off = 0, s->hdr_len = 14;   /* not a frame whose IP lengths we can set */
    if (sc->csum == DP_CSUM_L4 && s->l3_off == 0) {
        snprintf(why, why_len, "generator stream %u: csum=L4 needs an IPv4/IPv6 template with "
                 "UDP or TCP", sc->stream);
        return -1;
    }
    uint32_t smallest = sc->tmpl_len;
    if (sc->n_sizes > DP_GEN_MAX_SIZES ||
        (sc->n_sizes && (s->l3_off == 0 || sc->csum != DP_CSUM_L4))) {
        snprintf(why, why_len, "generator stream %u: a cycle of %u sizes needs at most %u, an "
                 "IP template and csum=L4", sc->stream, sc->n_sizes, DP_GEN_MAX_SIZES);
        return -1;
    }
    for (uint32_t k = 0; k < sc->n_sizes; k++) {
        if (sc->sizes[k] < s->hdr_len || sc->sizes[k] > sc->tmpl_len) {
            snprintf(why, why_len, "generator stream %u: size %u outside %u..%u (headers.."
                     "template)", sc->stream, sc->sizes[k], s->hdr_len, sc->tmpl_len);
            return -1;
        }
        smallest = sc->sizes[k] < smallest ? sc->sizes[k] : smallest;
    }
    if (sc->vary_off && (sc->vary_off + 2u > smallest - (sc->n_sizes ? 0u : DP_GEN_TRAILER) ||
                         sc->vary_max < sc->vary_min)) {
        snprintf(why, why_len, "generator stream %u: vary field at %u (%u..%u) outside the "
                 "%u-byte frame's headers, or max < min", sc->stream, sc->vary_off,
                 sc->vary_min, sc->vary_max, smallest);
        return -1;
    }
    s->vary_off = sc->vary_off;
    s->vary_range = (uint32_t)sc->vary_max - sc->vary_min + 1;
    s->csum = sc->csum;
    return 0;
}

int dp_gen_prepare(struct dp_gen_state *g, const struct dp_gen_config *gc,
                   struct dp_gen_stream_ctl *ctl, uint32_t max_len, uint32_t max_burst,
                   uint64_t hz, uint64_t now, char *why, size_t why_len)
{
    memset(g, 0, sizeof(*g));
    if (gc->n_streams < 1 || gc->n_streams > DP_GEN_MAX_STREAMS) {
        snprintf(why, why_len, "generator: %u streams, need 1..%u", gc->n_streams,
                 DP_GEN_MAX_STREAMS);
        return -1;
    }
    uint32_t lim = max_len < DP_TMPL_MAX ? max_len : DP_TMPL_MAX;
    g->burst = gc->burst < 1 ? 1 : gc->burst > max_burst ? max_burst : gc->burst;
    g->n = g->live = gc->n_streams;
    g->hz = hz;
    g->ctl = ctl;
    for (uint32_t i = 0; i < gc->n_streams; i++) {
        struct dp_gen_stream_state *s = &g->s[i];
        const struct dp_gen_stream_config *sc = &gc->s[i];
        if (gen_check_stream(s, sc, lim, why, why_len) < 0)
            return -1;
        struct dp_gen_stream_ctl *c = &ctl[i];
        if (c->stream != sc->stream) {   /* a new stream in this slot: its own seq space */
            c->stream = sc->stream;
            c->seq = c->issued = 0;
            c->cfg_rate_pps = ~0ull;
        }
        if (c->cfg_rate_pps != sc->rate_pps) {   /* first start, or a reload changed it */
            c->cfg_rate_pps = sc->rate_pps;
            __atomic_store_n(&c->rate_pps, sc->rate_pps, __ATOMIC_RELAXED);
        }
        gen_set_rate(g, s, __atomic_load_n(&c->rate_pps, __ATOMIC_RELAXED));
        s->last = s->next = now;
    }
    return 0;
}

void dp_gen_tick(struct dp_gen_state *g, const struct dp_gen_stream_ctl *ctl)
{
    for (uint32_t i = 0; i < g->n; i++) {
        uint64_t r = __atomic_load_n(&ctl[i].rate_pps, __ATOMIC_RELAXED);
        if (r != g->s[i].rate)
            gen_set_rate(g, &g->s[i], r);
    }
}

void dp_gen_restart_clock(struct dp_gen_state *g, uint64_t now)
{
    for (uint32_t i = 0; i < g->n; i++)
        g->s[i].last = g->s[i].next = now;
}

/* A capture's timing: how many of its next frames are due by now (at most max); moves
 * s->next past them, since the caller builds them all. */
static uint64_t gen_due_capture(struct dp_gen_state *g, const struct dp_gen_stream_config *sc,
                                uint32_t i, uint64_t now, uint64_t max)
{
    struct dp_gen_stream_state *s = &g->s[i];
    uint64_t k = g->ctl[i].issued, n = 0;
    while (n < max && s->next <= now) {
        n++;
        uint64_t gap = sc->gap_ns[(k + n) % sc->n_frames];
        s->next += (uint64_t)((unsigned __int128)gap * g->hz / 1000000000u);
    }
    return n;
}

uint32_t dp_gen_due(struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t i,
                    uint64_t now)
{
    struct dp_gen_stream_state *s = &g->s[i];
    uint64_t n = g->burst;
    uint64_t dt = now - s->last < g->hz ? now - s->last : g->hz;
    s->last = now;
    uint64_t count = gc->s[i].count;
    if (count && n > count - s->sent)
        n = count - s->sent;
    if (gc->s[i].n_frames && gc->s[i].pace_capture)
        return (uint32_t)gen_due_capture(g, &gc->s[i], i, now, n);
    if (s->rate) {
        s->credit += dt * s->rate;
        if (s->credit > s->cap)
            s->credit = s->cap;
        if (n > s->credit / g->hz)
            n = s->credit / g->hz;
    }
    return (uint32_t)n;
}

int dp_gen_took(struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t i, uint32_t k)
{
    struct dp_gen_stream_state *s = &g->s[i];
    s->sent += k;
    if (s->rate && !(gc->s[i].n_frames && gc->s[i].pace_capture))   /* paced by its bucket */
        s->credit -= (uint64_t)k * g->hz;
    if (!s->done && gc->s[i].count && s->sent >= gc->s[i].count) {
        s->done = 1;
        g->live--;
    }
    return g->live == 0;
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

/* A frame cut from the template to len bytes: its IP and UDP lengths say so. */
static void gen_set_lengths(const struct dp_gen_stream_state *s, uint8_t *f, uint32_t len)
{
    uint8_t *l3 = f + s->l3_off;
    uint32_t ip = len - s->l3_off;
    if ((l3[0] >> 4) == 4) {
        l3[2] = (uint8_t)(ip >> 8);
        l3[3] = (uint8_t)ip;
    } else {
        l3[4] = (uint8_t)((ip - 40) >> 8);
        l3[5] = (uint8_t)(ip - 40);
    }
    if (s->hdr_len - s->l4_off == 8) {   /* UDP: its length field; TCP has none */
        uint32_t udp = len - s->l4_off;
        f[s->l4_off + 4] = (uint8_t)(udp >> 8);
        f[s->l4_off + 5] = (uint8_t)udp;
    }
}

uint32_t dp_gen_fill(const struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t i,
                     uint8_t *f, struct dp_gen_stream_ctl *ctl, uint64_t ns)
{
    const struct dp_gen_stream_state *s = &g->s[i];
    const struct dp_gen_stream_config *sc = &gc->s[i];
    uint64_t k = ctl->issued++;
    if (sc->n_frames) {   /* a capture's frame as it was, the trailer after it */
        uint32_t j = (uint32_t)(k % sc->n_frames), len = sc->frame_len[j];
        memcpy(f, sc->frames + sc->frame_off[j], len);
        if (!sc->trail[j])
            return len;
        struct dp_gen_trailer t = { .seq = ctl->seq++, .tx_ns = ns, .stream = sc->stream,
                                    .magic = DP_GEN_MAGIC };
        memcpy(f + len, &t, sizeof(t));
        return len + DP_GEN_TRAILER;
    }
    uint32_t len = sc->n_sizes ? sc->sizes[k % sc->n_sizes] : s->len;
    memcpy(f, sc->tmpl, len);
    if (len != s->len)
        gen_set_lengths(s, f, len);
    if (s->vary_off) {
        uint16_t v = (uint16_t)(sc->vary_min + k % s->vary_range);
        f[s->vary_off] = (uint8_t)(v >> 8);
        f[s->vary_off + 1] = (uint8_t)v;
    }
    /* a frame too short for headers and trailer goes without: counted, not sequence-tracked */
    if (len >= s->hdr_len + DP_GEN_TRAILER) {
        struct dp_gen_trailer t = { .seq = ctl->seq++, .tx_ns = ns, .stream = sc->stream,
                                    .magic = DP_GEN_MAGIC };
        memcpy(f + len - DP_GEN_TRAILER, &t, sizeof(t));
    }
    if (s->csum == DP_CSUM_L4)
        gen_csum(f + s->l3_off);
    return len;
}
