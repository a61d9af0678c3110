/* dp_gen.h: the generator's frame rules, shared by the DPDK and the io_uring worker so both
 * send the same bytes: template, varied 16-bit field, trailer (seq, tx_ns, stream, magic) at
 * the end, IPv4/IPv6 + UDP/TCP checksums per packet; and the token bucket that paces them.
 *
 * Time is whatever clock the caller has (TSC cycles, or ns) with `hz` ticks per second. */
#ifndef DP_GEN_H
#define DP_GEN_H

#include <stddef.h>
#include <stdint.h>

#include "dp_worker.h"

#define DP_GEN_TRAILER ((uint16_t)sizeof(struct dp_gen_trailer))

struct dp_gen_state {
    uint32_t burst, len, vary_off, vary_range, l3_off, csum;
    uint64_t sent;      /* packets the port took */
    uint64_t credit;    /* token bucket, in packets x hz: no division per packet, no drift */
    uint64_t cap, last, hz;
};

/* Check the generator config against a frame limit and prepare *g.  0, or -1 with a reason in
 * why[why_len].  max_burst bounds gc->burst. */
int dp_gen_prepare(struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t max_len,
                   uint32_t max_burst, uint64_t hz, uint64_t now, char *why, size_t why_len);

/* Packets to send now (0..burst): the rate's credit and what is left of gc->count. */
uint32_t dp_gen_due(struct dp_gen_state *g, const struct dp_gen_config *gc, uint64_t now);

/* The port took k packets: spend their credit.  Returns 1 when gc->count is reached. */
int dp_gen_took(struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t k);

/* Fill one frame of g->len bytes at f: template, varied field, trailer, checksums. */
void dp_gen_fill(const struct dp_gen_state *g, const struct dp_gen_config *gc, uint8_t *f,
                 uint64_t seq, uint64_t ns);

/* DP_F_GENERATED when a received packet of len bytes at frame ends with our trailer.  Our
 * generator sends UDP or TCP only; an ICMP error quoting one of its frames ends with the same
 * trailer and must not count as a second copy; a truncated frame's end is not its end. */
static inline uint16_t dp_gen_flag(const uint8_t *frame, uint32_t len, uint8_t l4proto,
                                   uint16_t flags)
{
    uint32_t magic;
    if ((flags & DP_F_TRUNCATED) || len < DP_GEN_TRAILER || (l4proto != 17 && l4proto != 6))
        return 0;
    __builtin_memcpy(&magic, frame + len - sizeof(magic), sizeof(magic));
    return magic == DP_GEN_MAGIC ? DP_F_GENERATED : 0;
}

#endif
