/* dp_capture.h: live capture's filter (dataplane.consumers.bpf).  A filter is compiled by
 * libpcap (pcap_compile on a dead DLT_EN10MB handle, so the syntax is tcpdump's) and run by
 * libpcap's bpf_filter() here, in C, over a whole batch of descriptors: no Python per packet
 * (docs/design.md, invariant 1).
 *
 * The descriptors are another process's shared memory: a descriptor whose addr + len leaves the
 * arena is counted as bad and its bytes are never read (invariant 5). */
#ifndef DP_CAPTURE_H
#define DP_CAPTURE_H

#include <stddef.h>
#include <stdint.h>
#include "dp_layout.h"

/* cffi: begin */
#define DP_BPF_ERR_LEN 512

struct dp_bpf;      /* a compiled filter: opaque, made by dp_bpf_compile, freed by dp_bpf_free */

/* The filter compiled for Ethernet frames cut to snaplen; NULL with why in err (libpcap's own
 * message).  An empty filter matches every frame. */
struct dp_bpf *dp_bpf_compile(const char *filter, uint32_t snaplen, char *err, size_t err_len);
void dp_bpf_free(struct dp_bpf *f);
/* Instructions in the compiled program (what `tcpdump -d` would list). */
uint32_t dp_bpf_len(const struct dp_bpf *f);

/* Run the filter over desc[0..n): the index of every match goes to idx[] (room for n) and its
 * captured length (its stored length, cut to snaplen) to caplen[]; returns how many matched.
 * *bad counts the descriptors whose bytes lie outside [0, size): never read, never matched. */
uint32_t dp_bpf_match(const struct dp_bpf *f, const uint8_t *base, uint64_t size,
                      const struct dp_desc *desc, uint32_t n, uint32_t snaplen,
                      uint32_t *idx, uint32_t *caplen, uint32_t *bad);

/* Copy the matched frames, caplen[i] bytes of desc[idx[i]] each, one after another into out
 * (out_len bytes); a descriptor that now lies outside the arena (its writer changed it since
 * the match) is copied as zeros.  Returns the bytes written (the sum of caplen[], or less if
 * out is too short: then the copy stops at the last frame that fits whole). */
uint64_t dp_bpf_copy(const uint8_t *base, uint64_t size, const struct dp_desc *desc,
                     const uint32_t *idx, const uint32_t *caplen, uint32_t m,
                     uint8_t *out, uint64_t out_len);
/* cffi: end */

#endif
