/* flowkey.c: the flow cache's per-packet work (dataplane/consumers/flowcache.py): for each
 * descriptor of a batch, the flow key read from the frame's bytes, its 64-bit hash, the IP-level
 * length, the TCP flags and the receive time (dp_flow_keys); then each packet folded into the
 * flow table, whose columns are Python's numpy arrays (dp_flow_fold).  Python handles what is
 * rare: a full table (evictions), timeouts, export.
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

static inline uint64_t mix(uint64_t h, uint64_t w)
{
    h ^= w * 0x9e3779b97f4a7c15ull;
    h = (h << 27 | h >> 37) * 0xc2b2ae3d27d4eb4full;
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
                      uint32_t n, uint8_t *keys, uint64_t *hash, uint32_t *ip_bytes,
                      uint8_t *tcp_flags, int64_t *rx_ns)
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
        uint64_t h = 0, w;
        for (uint32_t j = 0; j < DP_FLOW_KEY_LEN; j += 8) {
            memcpy(&w, key + j, 8);
            h = mix(h, w);
        }
        hash[k] = h ^ h >> 31;
        rx_ns[k++] = (int64_t)x->rx_ns;
    }
    return k;
}

/* The flow table: columns owned by Python (flowcache.FlowTable), entries 0..*used-1, found
 * through `index`, an open-addressing table of entry numbers (-1: empty; mask + 1 slots, at least
 * twice the capacity, so a probe ends soon).  Keys are compared whole: two keys of one hash are
 * two flows. */
static int64_t find(const uint64_t *t_keys, const uint64_t *t_hash, const int32_t *index,
                    uint32_t mask, const uint8_t *key, uint64_t h, uint32_t *slot)
{
    uint32_t s = (uint32_t)h & mask;
    for (;;) {
        int32_t e = index[s];
        if (e < 0) {
            *slot = s;
            return -1;
        }
        if (t_hash[e] == h && memcmp(t_keys + (uint64_t)e * (DP_FLOW_KEY_LEN / 8), key,
                                     DP_FLOW_KEY_LEN) == 0)
            return e;
        s = (s + 1) & mask;
    }
}

uint32_t dp_flow_fold(uint32_t n, const uint8_t *keys, const uint64_t *hash,
                      const uint32_t *ip_bytes, const uint8_t *tcp_flags, const int64_t *rx_ns,
                      const uint32_t *which, uint64_t *t_keys, uint64_t *t_hash,
                      int64_t *t_packets, int64_t *t_bytes, int64_t *t_first, int64_t *t_last,
                      uint8_t *t_flags, uint32_t *used, uint32_t capacity, int32_t *index,
                      uint32_t mask, uint32_t *missed)
{
    uint32_t m = 0;
    for (uint32_t j = 0; j < n; j++) {
        uint32_t i = which ? which[j] : j, slot;
        const uint8_t *key = keys + (uint64_t)i * DP_FLOW_KEY_LEN;
        int64_t e = find(t_keys, t_hash, index, mask, key, hash[i], &slot);
        if (e < 0) {
            if (*used >= capacity) {
                missed[m++] = i;      /* Python makes room and folds it again */
                continue;
            }
            e = (*used)++;
            index[slot] = (int32_t)e;
            memcpy(t_keys + (uint64_t)e * (DP_FLOW_KEY_LEN / 8), key, DP_FLOW_KEY_LEN);
            t_hash[e] = hash[i];
            t_packets[e] = t_bytes[e] = 0;
            t_first[e] = t_last[e] = rx_ns[i];
            t_flags[e] = 0;
        }
        t_packets[e] += 1;
        t_bytes[e] += ip_bytes[i];
        if (rx_ns[i] < t_first[e])
            t_first[e] = rx_ns[i];
        if (rx_ns[i] > t_last[e])
            t_last[e] = rx_ns[i];
        t_flags[e] |= tcp_flags[i];
    }
    return m;
}

void dp_flow_reindex(const uint64_t *t_hash, uint32_t used, int32_t *index, uint32_t mask)
{
    memset(index, 0xff, ((size_t)mask + 1) * sizeof(*index));    /* all -1 */
    for (uint32_t e = 0; e < used; e++) {
        uint32_t s = (uint32_t)t_hash[e] & mask;
        while (index[s] >= 0)
            s = (s + 1) & mask;
        index[s] = (int32_t)e;
    }
}
