/* dp_gen.h: the generator's frame rules, shared by the DPDK and the io_uring worker so both
 * send the same bytes: per stream a template cut to the size cycle's length, varied 16-bit
 * field, trailer (seq, tx_ns, stream, magic) at the end, IPv4/IPv6 + UDP/TCP lengths and
 * checksums per packet; and each stream's token bucket, at a rate Python may change.
 *
 * Time is whatever clock the caller has (TSC cycles, or ns) with `hz` ticks per second. */
#ifndef DP_GEN_H
#define DP_GEN_H

#include <stddef.h>
#include <stdint.h>

#include "dp_worker.h"

#define DP_GEN_TRAILER ((uint16_t)sizeof(struct dp_gen_trailer))

/* One stream's pacing and frame facts. */
struct dp_gen_stream_state {
    uint32_t len, vary_off, vary_range, l3_off, l4_off, hdr_len, csum, done;
    uint64_t sent;      /* packets the port took since this worker started */
    uint64_t rate;      /* packets/s now: the arena's rate_pps, read each tick */
    uint64_t credit;    /* token bucket, in packets x hz: no division per packet, no drift */
    uint64_t cap, last;
    uint64_t next;      /* pcap timing: when the frame at ctl->issued is due */
};

struct dp_gen_state {
    uint32_t burst, n, live;   /* live: streams not done with their count */
    uint64_t hz;
    struct dp_gen_stream_ctl *ctl;   /* the arena's, per stream */
    struct dp_gen_stream_state s[DP_GEN_MAX_STREAMS];
};

/* Check the generator config against a frame limit and prepare *g and the arena's per-stream
 * control `ctl` (a restart continues its seq; a rate Python set survives unless the config's
 * rate changed).  0, or -1 with a reason in why[why_len].  max_burst bounds gc->burst. */
int dp_gen_prepare(struct dp_gen_state *g, const struct dp_gen_config *gc,
                   struct dp_gen_stream_ctl *ctl, uint32_t max_len, uint32_t max_burst,
                   uint64_t hz, uint64_t now, char *why, size_t why_len);

/* The periodic tick: each stream's rate from the arena (Python may have changed it). */
void dp_gen_tick(struct dp_gen_state *g, const struct dp_gen_stream_ctl *ctl);

/* Start every stream's clock now (a link that just came up owes nothing for the wait). */
void dp_gen_restart_clock(struct dp_gen_state *g, uint64_t now);

/* Packets stream i may send now (0..burst): its rate's credit and what is left of its count. */
uint32_t dp_gen_due(struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t i,
                    uint64_t now);

/* The port took k packets of stream i: spend their credit.  Returns 1 when every stream has
 * reached its count (the generator is done). */
int dp_gen_took(struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t i, uint32_t k);

/* Fill stream i's next frame at f (room for g->s[i].len bytes): a capture's next frame with
 * the trailer appended, or the template cut to the
 * cycle's size, varied field, trailer (when the frame has room after its headers; it then
 * takes the next seq), checksums.  Advances ctl->issued (and ctl->seq); returns the length. */
uint32_t dp_gen_fill(const struct dp_gen_state *g, const struct dp_gen_config *gc, uint32_t i,
                     uint8_t *f, struct dp_gen_stream_ctl *ctl, uint64_t ns);

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
