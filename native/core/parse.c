/* parse.c: the bounds-checked L2-L4 parser the workers run on every received frame.
 *
 * It fills ethertype, l4proto, l4_off, hash and flags of a descriptor.  Every read is preceded
 * by a check against len, so nothing past frame[len - 1] is read whatever the headers claim.
 *
 * Each header ends up in one of three states:
 *   fits       within the frame and within the length its IP header declares;
 *   cut        the IP header declares more bytes than the frame holds (a snap length, a short
 *              copy): DP_F_TRUNCATED, return 0; a header that falls in the missing part is not
 *              parsed (l4_off 0) but the frame is not an error;
 *   malformed  a header claims bytes that its enclosing header (or the frame, for L2 and the IP
 *              header itself) does not have, a field is impossible (IPv4 IHL < 5, TCP data
 *              offset < 5, UDP length < 8), a runt (< 14 bytes), more than MAX_VLAN_TAGS tags or
 *              MAX_V6_EXT extension headers: DP_F_MALFORMED, return -1, and only ethertype is
 *              meaningful (l4proto, l4_off and hash are 0).
 *
 * Fields:
 *   ethertype  innermost, after up to MAX_VLAN_TAGS 0x8100/0x88a8/0x9100 tags (DP_F_VLAN).
 *   l4proto    the IP protocol / last IPv6 next header, also for non-first fragments and
 *              protocols this parser does not know; 0 when there is no IP.
 *   l4_off     where that header starts, or 0 when it is not in the frame: non-first fragment
 *              (DP_F_FRAGMENT), cut off, IPv6 next header 59, empty payload.  TCP, UDP, ICMP and
 *              ICMPv6 headers are validated and lie wholly within the frame when l4_off != 0;
 *              for other protocols at least one byte at l4_off is in the frame.
 *   hash       SYMMETRIC: (src, sport, dst, dport, proto) and (dst, dport, src, sport, proto)
 *              hash alike, so both directions of a flow fall in one bucket, on one consumer.
 *              Ports count only for TCP and UDP, and not for any fragment (first or not), so all
 *              fragments of one datagram share a hash.  Never 0 when there is IP; 0 without.
 *   flags      MALFORMED, VLAN, IP_OPTIONS, IPV6_EXT and FRAGMENT belong to the parser and are
 *              set afresh (a reused descriptor keeps no stale ones); TRUNCATED, COPIED and
 *              GENERATED may also come from the caller and are only ever ORed in.
 */
#include <string.h>
#ifdef __SSE4_2__
#include <nmmintrin.h>
#endif

#include "dp_worker.h"

#define ETH_HLEN      14u
#define MAX_VLAN_TAGS 4    /* QinQ needs 2; a deeper stack is junk or an attack */
#define MAX_V6_EXT    8
#define OWN_FLAGS     (DP_F_MALFORMED | DP_F_VLAN | DP_F_IP_OPTIONS | DP_F_IPV6_EXT | DP_F_FRAGMENT)

enum { FIT = 0, CUT = 1, LIE = -1 };
enum { NOT_FRAG = 0, FIRST_FRAG = 1, LATER_FRAG = 2 };

struct pctx {
    const uint8_t *f;
    uint32_t len;      /* bytes in the frame */
    uint32_t l3_end;   /* where the IP header says the packet ends; may be past len */
    uint16_t flags;
};

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* Bytes [off, off + n) against the declared packet first: past it is a lie even in a short
 * frame, within it but past the frame is only a cut. */
static inline int need(const struct pctx *c, uint32_t off, uint32_t n)
{
    if (off + n > c->l3_end)
        return LIE;
    return off + n > c->len ? CUT : FIT;
}

#ifdef __SSE4_2__
#define MIX(h, w) _mm_crc32_u32((h), (w))
#else
static inline uint32_t MIX(uint32_t h, uint32_t w)
{
    h = (h ^ w) * 0x9e3779b1u;
    return h ^ (h >> 15);
}
#endif

static inline uint32_t endpoint_hash(const uint8_t *addr, uint32_t alen, uint16_t port)
{
    uint32_t h = 0x5bd1e995u, w;
    for (uint32_t i = 0; i < alen; i += 4) {
        memcpy(&w, addr + i, 4);
        h = MIX(h, w);
    }
    return MIX(h, port);
}

/* Adding the two endpoints' hashes is what makes it symmetric; the murmur3 finaliser spreads
 * the CRC's linear structure over all bits, so any bucket mask of the result is usable. */
static uint32_t flow_hash(const uint8_t *src, const uint8_t *dst, uint32_t alen, uint16_t sport,
                          uint16_t dport, uint8_t proto)
{
    uint32_t h = MIX(endpoint_hash(src, alen, sport) + endpoint_hash(dst, alen, dport), proto);
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h ? h : 1;
}

/* The transport header at off, after an IP header whose addresses are src/dst. */
static int l4(struct pctx *c, struct dp_desc *d, uint8_t proto, uint32_t off, int frag,
              const uint8_t *src, const uint8_t *dst, uint32_t alen)
{
    const uint8_t *t = c->f + off;
    uint16_t sport = 0, dport = 0;
    int r;

    if (off > c->l3_end)                 /* an extension header ran past the packet */
        return LIE;
    if (frag == LATER_FRAG) {
        c->flags |= DP_F_FRAGMENT;
        r = CUT;
    } else if (proto == 6) {            /* TCP */
        r = need(c, off, 20);
        if (r == FIT && (t[12] >> 4) < 5)
            return LIE;
        if (r == FIT)
            r = need(c, off, (t[12] >> 4) * 4u);
    } else if (proto == 17) {           /* UDP: a first fragment carries only part of ulen */
        r = need(c, off, 8);
        if (r == FIT && (rd16(t + 4) < 8 || (frag == NOT_FRAG && off + rd16(t + 4) > c->l3_end)))
            return LIE;
    } else if (proto == 1 || proto == 58) {   /* ICMP, ICMPv6: type, code, csum, 4 more */
        r = need(c, off, 8);
    } else {                            /* unknown payload (or 59, no next header) */
        r = proto != 59 && need(c, off, 1) == FIT ? FIT : CUT;
    }
    if (r == LIE)
        return LIE;
    if (r == FIT && frag == NOT_FRAG && (proto == 6 || proto == 17)) {
        sport = rd16(t);
        dport = rd16(t + 2);
    }
    d->l4proto = proto;
    d->l4_off = r == FIT ? (uint16_t)off : 0;
    d->hash = flow_hash(src, dst, alen, sport, dport, proto);
    return 0;
}

static int ipv4(struct pctx *c, struct dp_desc *d, uint32_t off)
{
    const uint8_t *ip = c->f + off;
    if (off + 20 > c->len || ip[0] >> 4 != 4)
        return LIE;
    uint32_t ihl = (ip[0] & 15u) * 4, tot = rd16(ip + 2);
    if (ihl < 20 || off + ihl > c->len || tot < ihl)
        return LIE;
    if (ihl > 20)
        c->flags |= DP_F_IP_OPTIONS;
    c->l3_end = off + tot;                /* shorter than the frame is Ethernet padding: fine */
    if (c->l3_end > c->len)
        c->flags |= DP_F_TRUNCATED;
    uint16_t fo = rd16(ip + 6);           /* flags:3 (reserved, DF, MF), offset:13 */
    int frag = (fo & 0x1fff) ? LATER_FRAG : (fo & 0x2000) ? FIRST_FRAG : NOT_FRAG;
    return l4(c, d, ip[9], off + ihl, frag, ip + 12, ip + 16, 4);
}

static inline int is_v6_ext(uint8_t nh)
{
    return nh == 0 || nh == 43 || nh == 44 || nh == 51 || nh == 60;
}

static int ipv6(struct pctx *c, struct dp_desc *d, uint32_t off)
{
    const uint8_t *ip = c->f + off;
    if (off + 40 > c->len || ip[0] >> 4 != 6)
        return LIE;
    /* Jumbograms (payload length 0 + a hop-by-hop jumbo option) are not handled: any payload
     * then runs past the declared end and counts as malformed. */
    c->l3_end = off + 40 + rd16(ip + 4);
    if (c->l3_end > c->len)
        c->flags |= DP_F_TRUNCATED;
    uint8_t nh = ip[6];
    uint32_t p = off + 40;
    int frag = NOT_FRAG;
    /* past the fragment header of a later fragment comes fragment data, not headers */
    for (int i = 0; is_v6_ext(nh) && frag != LATER_FRAG; i++) {
        /* every extension header is at least 8 bytes, so the walk always advances; the cap
         * and "hop-by-hop only first" are what stop a chain that repeats itself */
        int r = need(c, p, 8);
        if (i == MAX_V6_EXT || (nh == 0 && i > 0) || r == LIE)
            return LIE;
        c->flags |= DP_F_IPV6_EXT;
        if (r == CUT) {                   /* the chain goes on in the missing part */
            d->hash = flow_hash(ip + 8, ip + 24, 16, 0, 0, 0);
            return 0;
        }
        const uint8_t *h = c->f + p;
        uint32_t hl = (h[1] + 1u) * 8;
        if (nh == 44) {                   /* fragment: offset:13, res:2, M:1 */
            uint16_t fo = rd16(h + 2);
            frag = (fo & 0xfff8) ? LATER_FRAG : (fo & 1) ? FIRST_FRAG : NOT_FRAG;
            hl = 8;
        } else if (nh == 51) {            /* AH counts 4-byte words, minus 2 */
            hl = (h[1] + 2u) * 4;
        }
        nh = h[0];
        p += hl;
    }
    return l4(c, d, nh, p, frag, ip + 8, ip + 24, 16);
}

int dp_parse(const uint8_t *frame, uint32_t len, struct dp_desc *d)
{
    struct pctx c = { frame, len, len, 0 };
    int r = LIE;

    d->ethertype = 0;
    d->l4proto = 0;
    d->l4_off = 0;
    d->hash = 0;
    if (len >= ETH_HLEN) {
        uint32_t off = ETH_HLEN;
        uint16_t et = rd16(frame + 12);
        int tags = 0;
        while ((et == 0x8100 || et == 0x88a8 || et == 0x9100) && tags < MAX_VLAN_TAGS &&
               off + 4 <= len) {
            et = rd16(frame + off + 2);
            off += 4;
            tags++;
        }
        d->ethertype = et;
        if (tags)
            c.flags |= DP_F_VLAN;
        if (et == 0x8100 || et == 0x88a8 || et == 0x9100)
            r = LIE;                      /* a tag cut short, or one tag too many */
        else if (et == 0x0800)
            r = ipv4(&c, d, off);
        else if (et == 0x86dd)
            r = ipv6(&c, d, off);
        else
            r = FIT;
    }
    if (r == LIE) {
        c.flags |= DP_F_MALFORMED;
        d->l4proto = 0;
        d->l4_off = 0;
        d->hash = 0;
    }
    d->flags = (uint16_t)((d->flags & ~OWN_FLAGS) | c.flags);
    return r == LIE ? -1 : 0;
}
