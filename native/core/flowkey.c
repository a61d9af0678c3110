/* flowkey.c: the flow cache's per-packet work (dataplane/consumers/flowcache.py): for each
 * descriptor of a batch, the flow key read from the frame's bytes, its 64-bit hash, the IP-level
 * length and the TCP flags.  Python folds the results per flow with numpy; this loop is the part
 * numpy would do in a dozen passes over the batch.
 *
 * The descriptors are the worker's shared memory, never trusted: a frame must lie inside the
 * arena (addr + len <= arena_size) and every header byte read inside the frame, or the packet is
 * left out.  Left out as well: frames the parser did not find to be IPv4 or IPv6, or found
 * malformed.  What the parser filled (ethertype, l4proto, l4_off) says where to look; the
 * addresses, ports, VLAN id and lengths come from the bytes.
 *
 * A key is DP_FLOW_KEY_LEN bytes: source address (16; IPv4 in the first 4, the rest zero),
 * destination address (16), source port, destination port (big-endian, zero without TCP/UDP
 * ports), IP protocol, IP version (4 or 6), outer VLAN id (big-endian, zero untagged). */
#include <string.h>

#include "dp_worker.h"

#define ETH_HLEN_   14u
#define MAX_TAGS_   4u      /* as the parser: a deeper stack is malformed */

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline int is_tag(uint16_t et) { return et == 0x8100 || et == 0x88a8 || et == 0x9100; }

static inline uint64_t mix(uint64_t h, uint64_t w, uint64_t m1, uint64_t m2)
{
    h ^= w * m1;
    h = (h << 27 | h >> 37) * m2;
    return h;
}

/* The key of one frame of len bytes; 0 when it has none (not IP, headers outside the frame). */
static int one_key(const uint8_t *f, uint32_t len, const struct dp_desc *d, uint8_t *key,
                   uint32_t *ip_bytes, uint8_t *tcp_flags)
{
    uint32_t l3 = ETH_HLEN_, tags = 0;
    uint16_t vlan = 0;
    while (tags < MAX_TAGS_ && l3 + 4 <= len && is_tag(rd16(f + l3 - 2))) {
        if (tags == 0)
            vlan = rd16(f + l3) & 0x0fff;
        l3 += 4;
        tags++;
    }
    int v6 = d->ethertype == 0x86dd;
    uint32_t alen = v6 ? 16 : 4, need = v6 ? 40 : 20;
    if (l3 + need > len)
        return 0;
    const uint8_t *ip = f + l3;
    if ((ip[0] >> 4) != (v6 ? 6 : 4))
        return 0;
    memset(key, 0, DP_FLOW_KEY_LEN);
    memcpy(key, ip + (v6 ? 8 : 12), alen);
    memcpy(key + 16, ip + (v6 ? 24 : 16), alen);
    *ip_bytes = v6 ? (uint32_t)rd16(ip + 4) + 40u : rd16(ip + 2);
    *tcp_flags = 0;
    uint32_t l4 = d->l4_off;
    if (l4 && (d->l4proto == 6 || d->l4proto == 17) && l4 + 4 <= len)
        memcpy(key + 32, f + l4, 4);
    if (l4 && d->l4proto == 6 && l4 + 14 <= len)
        *tcp_flags = f[l4 + 13];
    key[36] = d->l4proto;
    key[37] = v6 ? 6 : 4;
    key[38] = (uint8_t)(vlan >> 8);
    key[39] = (uint8_t)vlan;
    return 1;
}

uint32_t dp_flow_keys(const uint8_t *arena, uint64_t arena_size, const struct dp_desc *d,
                      uint32_t n, uint8_t *keys, uint64_t *hash, uint64_t *check,
                      uint32_t *ip_bytes, uint8_t *tcp_flags, uint32_t *index)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct dp_desc *x = &d[i];
        if ((x->ethertype != 0x0800 && x->ethertype != 0x86dd) || (x->flags & DP_F_MALFORMED))
            continue;
        if (x->addr > arena_size || x->len > arena_size - x->addr)
            continue;     /* a lying descriptor: nothing outside the arena is read */
        uint8_t *key = keys + (uint64_t)k * DP_FLOW_KEY_LEN;
        if (!one_key(arena + x->addr, x->len, x, key, &ip_bytes[k], &tcp_flags[k]))
            continue;
        /* two independent hashes: Python groups by the first and compares the second, so two
         * keys fold together only if both collide (about 2^-128 a pair) */
        uint64_t h = 0, c = 0x243f6a8885a308d3ull, w;
        for (uint32_t j = 0; j < DP_FLOW_KEY_LEN; j += 8) {
            memcpy(&w, key + j, 8);
            h = mix(h, w, 0x9e3779b97f4a7c15ull, 0xc2b2ae3d27d4eb4full);
            c = mix(c, w, 0xff51afd7ed558ccdull, 0xc4ceb9fe1a85ec53ull);
        }
        hash[k] = h ^ h >> 31;
        check[k] = c ^ c >> 29;
        index[k++] = i;
    }
    return k;
}
